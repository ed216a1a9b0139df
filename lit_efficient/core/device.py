"""Host and device: waiting for the device, reading host tensors, page-locked copies.

The hot path never waits for the device (see the design's hot-path contract); these are the few
places that do on purpose, or that make sure a copy does not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    pass


def synchronize(device: torch.device) -> None:
    """Wait for ``device`` to finish its queued work (nothing to wait for on a CPU)."""
    backend = getattr(torch, device.type, None) if device.type != "cpu" else None
    if backend is not None and callable(getattr(backend, "synchronize", None)) and backend.is_available():
        backend.synchronize(device) if device.type == "cuda" else backend.synchronize()


def host_int(value: torch.Tensor) -> int:
    """``int(value)`` of a one-element tensor that lives on the host, such as a CPU generator's draw:
    no device to wait for (the sync-counting test exempts this helper, and only this one)."""
    if value.device.type != "cpu":
        raise ValueError(f"host_int reads host tensors only; this one is on {value.device}")
    return int(value)


def pinned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in page-locked host memory when a CUDA device exists: a copy of it (or of a slice
    of it) to the device with ``non_blocking=True`` then does not wait for the stream, as a copy
    from ordinary (pageable) memory does."""
    return tensor.pin_memory() if torch.cuda.is_available() and not tensor.is_pinned() else tensor
