"""Serve a frozen prefix's output from memory instead of running it again.

Once blocks 0..k are frozen (and in eval mode), their output for a given input never changes. With
data that repeat exactly from epoch to epoch (no random augmentation: token blocks, fixed images),
:class:`FrozenOutputCache` keeps the output of the last frozen block for every input row it has
seen and serves it: the blocks before the last return their input unchanged and the last returns
the stored rows; only unseen rows run through the frozen blocks (and rows stored for a shorter
prefix through the newly frozen blocks only). This is
the activation caching of Egeria (Wang et al., "Egeria: Efficient DNN Training with
Knowledge-Guided Layer Freezing", EuroSys 2023, https://arxiv.org/abs/2201.06227) on top of
prefix freezing.

The cache is content-addressed: a row's key is a hash of the exact bytes of the first served
block's input row (plus every other tensor the block receives, and its scalar arguments), computed
on the tensors' device; one copy of 32 bytes a row comes to the host per forward. Anything
that changes that input — augmentation, dropout upstream, a different timestep — simply misses;
a hit can only serve what the blocks would have computed. The structure is learnt on the first
forward after every freezing change: the frozen blocks must be called once each, in order, each
feeding the next its output; blocks whose output shape differs from their input (a ResNet stage
transition) or that return more than one tensor (a UNet's skip connections) are run, and serving
starts after them. Rows are run apart from their batch only when the blocks take no other per-row
input (a padding mask); otherwise a batch is served when all its rows are known. The cache is not
saved in checkpoints: after a resume it refills in one epoch.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any, Callable, Optional

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lit_efficient.core.lightning_internals import replace_method, restore_method


def _tensor_part(output: Any) -> Optional[torch.Tensor]:
    """The tensor a block passes on: the output itself, or the first element of a tuple whose other
    elements are None (Hugging Face layers); None if the output carries anything else."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        if all(o is None for o in output[1:]):
            return output[0]
    return None


def _like(tail: Optional[tuple], tensor: torch.Tensor) -> Any:
    """``tensor`` in the structure a block returned: alone (``tail`` None) or followed by ``tail``."""
    return tensor if tail is None else (tensor, *tail)


def tensors_in(value: Any) -> list[torch.Tensor]:
    return [item for item in _flatten(value, []) if isinstance(item, torch.Tensor)]


def _row_bytes(row: torch.Tensor) -> int:
    return row.numel() * row.element_size()


def _flatten(value: Any, out: list) -> list:
    if isinstance(value, (list, tuple)):
        for item in value:
            _flatten(item, out)
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            out.append(str(key))
            _flatten(value[key], out)
    else:
        out.append(value)
    return out


_PRIME = 2_147_483_647  # 2**31 - 1


_LANES = 4  # independent hashes of every row: 4 x 31 bits


_CHUNK = 4096  # 16-bit words hashed at a time: rows x 4 x 4096 int64 of scratch, whatever the row's size


_COEFFICIENTS: dict[str, torch.Tensor] = {}  # per device: (4, n) coefficients for word positions 0..n-1


def _coefficients(end: int, device: torch.device) -> torch.Tensor:
    """The coefficients of word positions ``0..end-1`` (one table per device, grown when needed; the
    same values in every process, so a key means the same everywhere)."""
    table = _COEFFICIENTS.get(str(device))
    if table is None or table.shape[1] < end:
        width = max(end, 2 * (table.shape[1] if table is not None else _CHUNK))
        generator = torch.Generator().manual_seed(20_231)
        table = torch.randint(1, _PRIME, (_LANES, width), generator=generator, dtype=torch.int64).to(device)
        _COEFFICIENTS[str(device)] = table
    return table[:, :end]


def _hash_rows(tensor: torch.Tensor, rows: int, offset: int) -> tuple[torch.Tensor, int]:
    """(rows, 4) int64 on the tensor's device: per lane ``Σ_j w_j·c_(offset+j) mod p`` over the row's
    exact bytes read as 16-bit words ``w`` (any dtype, bf16 and bool included), and the offset where
    the next tensor's words start. The hash is linear, so the tensors of one row add up to the hash
    of their concatenation: two rows that differ anywhere agree in a lane with probability 1/p over
    the coefficients, in all four about 2**-124."""
    flat = tensor.detach().reshape(rows, -1)
    raw = (flat.to(torch.uint8) if flat.dtype == torch.bool else flat.contiguous().view(torch.uint8)) if flat.numel() \
        else torch.zeros(rows, 0, dtype=torch.uint8, device=tensor.device)
    words = (raw.shape[1] + 1) // 2
    total = torch.zeros(rows, _LANES, dtype=torch.int64, device=tensor.device)
    coefficients = _coefficients(offset + words, tensor.device)
    for start in range(0, words, _CHUNK):
        chunk = raw[:, 2 * start : 2 * (start + _CHUNK)].to(torch.int64)
        if chunk.shape[1] % 2:
            chunk = torch.nn.functional.pad(chunk, (0, 1))
        pairs = chunk.view(rows, -1, 2)
        w = pairs[..., 0] | (pairs[..., 1] << 8)  # bytes to words without reinterpreting memory
        c = coefficients[:, offset + start : offset + start + w.shape[1]]
        total = (total + (w[:, None, :] * c[None]).sum(-1) % _PRIME) % _PRIME
    return total, offset + words


def row_keys(args: tuple, kwargs: dict, salt: bytes = b"", on_device: Optional[bool] = None) -> list[bytes]:
    """One key per row of ``args[0]``: a digest of ``salt``, the shapes and dtypes and the scalar
    arguments, and of that row of every tensor argument with the batch as first dimension and of
    every other tensor whole.

    Where the tensors live decides how (``on_device`` forces one way; a run always takes the same):
    on an accelerator they are hashed there (:func:`_hash_rows`, a tensor shared by the batch once)
    and only the 32 bytes of each row's hash come to the host, in one copy — what decides which rows
    the frozen blocks must still run; on the CPU, where the bytes already are, blake2b reads them in
    place (faster there)."""
    batch = args[0].shape[0]
    device = args[0].device
    if batch == 0:
        return []
    on_device = device.type != "cpu" if on_device is None else on_device
    described = hashlib.blake2b(salt + (b"device" if on_device else b"host"), digest_size=16)
    total = torch.zeros(batch, _LANES, dtype=torch.int64, device=device) if on_device else None
    host_rows: list[Any] = []
    offset = 0
    for item in _flatten((args, kwargs), []):
        if isinstance(item, torch.Tensor):
            per_row = item.dim() > 0 and item.shape[0] == batch
            described.update(f"{'row' if per_row else ''}{tuple(item.shape[1:] if per_row else item.shape)}{item.dtype}"
                             .encode())
            if on_device:
                part, offset = _hash_rows(item.to(device), batch if per_row else 1, offset)
                total = (total + part) % _PRIME  # a shared tensor's one hash is added to every row
            elif per_row:
                host_rows.append(_host_bytes(item, batch))
            else:
                described.update(_host_bytes(item, 1).tobytes())
        elif item is None or isinstance(item, (bool, int, float, str)):
            described.update(repr(item).encode())
    prefix = described.digest()
    if on_device:
        hashes = total.cpu().numpy()
        return [prefix + hashes[i].tobytes() for i in range(batch)]
    keys = []
    for i in range(batch):
        digest = hashlib.blake2b(prefix, digest_size=16)
        for rows in host_rows:
            digest.update(rows[i].data)
        keys.append(digest.digest())
    return keys


def _host_bytes(tensor: torch.Tensor, rows: int) -> Any:
    """A CPU tensor's exact bytes as a (rows, bytes) numpy array, read in place where it is contiguous."""
    flat = tensor.detach().reshape(rows, -1).contiguous()
    return (flat.to(torch.uint8) if flat.dtype == torch.bool else flat.view(torch.uint8)).numpy()


class FrozenOutputCache:
    """Per-row outputs of the frozen blocks, keyed by content, within a memory budget.

    ``extend(modules)`` is called with the frozen blocks' modules in forward order each time the
    frozen prefix grows. The rows of the shorter prefix are then kept as ``previous``: their rows
    run only the newly frozen blocks, and move up. The cache is consulted only while ``active``
    (training and validation batches).
    """

    def __init__(self, budget_bytes: int, agree: Optional[Callable[[bool], bool]] = None) -> None:
        self.budget_bytes = budget_bytes
        # Under FSDP2 every frozen block all-gathers its shards in its forward, so all ranks must run or
        # skip it alike: ``agree(complete)`` says whether every rank holds all of its batch's rows; the
        # batch is then served whole on every rank, or else run whole on every rank (no partial serving).
        self.agree = agree
        self.rows: dict[bytes, torch.Tensor] = {}  # output of the last frozen module
        self.previous: dict[bytes, torch.Tensor] = {}  # output of the last module frozen before
        self.nbytes = 0  # of both
        self.modules: list[nn.Module] = []
        self.active = False
        self.start: Optional[int] = None  # first module served from the cache; learnt on a forward
        self.disabled: Optional[str] = None  # why this prefix cannot be served (warned once)
        self._for_good = False
        self.forwards = self.served = self.served_in_part = 0  # forwards through the prefix
        self.row_hits = 0  # rows found (in ``rows`` or ``previous``)
        self._originals: list[tuple[nn.Module, Any]] = []
        self._tails: list[Optional[tuple]] = []  # what each module returns after its tensor (structure)
        self._previous_last = self._previous_start = -1
        self._plan: Optional[str] = None
        self._served: Optional[torch.Tensor] = None
        self._keys: list[bytes] = []
        self._computing = False  # running the modules ourselves: their wrappers step aside
        self._trace: list[tuple[int, tuple, dict, Any]] = []

    # -- the frozen modules -----------------------------------------------------------------------
    def extend(self, modules: list[nn.Module]) -> None:
        """The frozen prefix now ends with ``modules`` (appended in forward order)."""
        reusable = self.rows and self.start is not None and self.disabled is None
        self.previous = self.rows if reusable else {}
        self._previous_last, self._previous_start = len(self.modules) - 1, self.start if reusable else -1
        self.rows = {}
        self.nbytes = sum(_row_bytes(row) for row in self.previous.values())
        for module in modules:
            index = len(self.modules)
            own = replace_method(module, "forward", functools.partial(self._forward, index, module.forward))
            self._originals.append((module, own))
            self.modules.append(module)
        self.start, self._plan = None, None
        if not self._for_good:
            self.disabled = None

    def clear(self) -> None:
        self.rows, self.previous, self.nbytes = {}, {}, 0

    def remove(self) -> None:
        """Give every module its own forward back."""
        for module, own in self._originals:
            restore_method(module, "forward", own)
        self._originals, self.modules = [], []
        self.clear()

    # -- one forward ------------------------------------------------------------------------------
    def _forward(self, index: int, original: Any, *args: Any, **kwargs: Any) -> Any:
        if not self.active or self._computing or self.disabled is not None:
            return original(*args, **kwargs)
        if torch.compiler.is_compiling():  # a compiled graph would bake one plan in
            self.disable("the frozen blocks run inside torch.compile")
            return original(*args, **kwargs)
        if not (args and isinstance(args[0], torch.Tensor)):
            self.disable("a frozen block takes its input by keyword, not as its first argument")
            return original(*args, **kwargs)
        last = len(self.modules) - 1
        if index == 0:
            self._plan, self._trace = ("learn" if self.start is None else "run"), []
        if self._plan == "run" and index == self.start:
            self._served = self._assemble(args, kwargs)
            self._plan = "serve" if self._served is not None else "store"
        if self._plan == "serve":
            if index < last:
                return _like(self._tails[index], args[0])  # skipped: nothing reads it but the next block
            self._plan = None
            self.forwards += 1
            return _like(self._tails[last], self._served)
        output = original(*args, **kwargs)
        if self._plan == "learn":
            self._trace.append((index, args, kwargs, output))
        if index == last and self._plan in ("learn", "store"):
            if self._plan == "learn":
                self._learn()
            elif (part := _tensor_part(output)) is not None and part.shape[0] == len(self._keys):
                for key, row in zip(self._keys, part.detach().clone().unbind(0)):
                    self._store(key, row)
            self._plan = None
            self.forwards += 1
        return output

    def _assemble(self, args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
        """The last frozen block's output for this batch: rows from the cache, rows of the shorter
        prefix run through the newly frozen blocks only, unseen rows through all of them. None (run
        the blocks as usual) if some rows are unseen and the blocks take other per-row inputs."""
        self._keys = keys = self._row_keys(args, kwargs)
        rows = [self.rows.get(k) for k in keys]
        complete = all(row is not None for row in rows)
        if self.agree is not None and not self.agree(complete):
            return None
        if complete:
            self.served += 1
            self.row_hits += len(rows)
            return torch.stack(rows)
        batch = len(keys)
        if any(t.dim() and t.shape[0] == batch for t in tensors_in((args[1:], kwargs))):
            return None  # e.g. a padding mask: rows cannot be run apart (would need slicing it); store them
        moving = [i for i, row in enumerate(rows) if row is None and keys[i] in self.previous]
        unseen = [i for i, row in enumerate(rows) if row is None and keys[i] not in self.previous]
        self.row_hits += batch - len(unseen)
        self.served_in_part += len(unseen) < batch
        with torch.no_grad():
            for indices, first in ((moving, self._previous_last + 1), (unseen, self.start)):
                if not indices:
                    continue
                if first == self.start:
                    x = args[0][torch.tensor(indices, device=args[0].device)]
                else:
                    x = torch.stack([self.previous[keys[i]] for i in indices])
                for row_index, row in zip(indices, self._run(first, x, args[1:], kwargs).clone().unbind(0)):
                    rows[row_index] = row
                    self._store(keys[row_index], row)
        return torch.stack(rows)

    @staticmethod
    def _row_keys(args: tuple, kwargs: dict) -> list[bytes]:
        # rows made under inference mode (Lightning's validation) cannot enter autograd: their own keys
        return row_keys(args, kwargs, b"inference" if torch.is_inference_mode_enabled() else b"")

    def _run(self, first: int, x: torch.Tensor, rest: tuple, kwargs: dict) -> torch.Tensor:
        """Modules ``first``..last on ``x`` (their other arguments are shared by all rows)."""
        self._computing = True
        try:
            for module in self.modules[first:]:
                x = _tensor_part(module(x, *rest, **kwargs))
        finally:
            self._computing = False
        return x

    def _learn(self) -> None:
        """From one traced forward: where serving can start, the structure to imitate, and its rows."""
        trace, self._trace = self._trace, []
        last = len(self.modules) - 1
        if [index for index, *_ in trace] != list(range(last + 1)):
            return self.disable("the frozen blocks are not called once each, in order, in one forward")
        outputs = [output for *_, output in trace]
        self._tails = [tuple(output[1:]) if isinstance(output, tuple) else None for output in outputs]
        tensors = [_tensor_part(output) for output in outputs]
        inputs = [args[0] for _, args, _, _ in trace]
        extras = [_flatten((args[1:], kwargs), []) for _, args, kwargs, _ in trace]
        if tensors[last] is None or tensors[last].shape[:1] != inputs[last].shape[:1]:
            return self.disable("the last frozen block returns more than one tensor per row")
        start = last
        while start > 0:  # walk back while each module feeds the next, same shape, same other arguments
            before, out_before = inputs[start - 1], tensors[start - 1]
            passes_through = (out_before is not None and out_before.shape == before.shape
                              and out_before.dtype == before.dtype)
            same_extras = len(extras[start]) == len(extras[start - 1]) and all(
                a is b or (not isinstance(a, torch.Tensor) and a == b)
                for a, b in zip(extras[start], extras[start - 1]))
            if not (passes_through and inputs[start] is out_before and same_extras):
                break
            start -= 1
        self.start = start
        if start != self._previous_start or self._previous_last < start:  # the shorter prefix's keys do not apply
            self.previous = {}
            self.nbytes = sum(_row_bytes(row) for row in self.rows.values())
        _, args, kwargs, _ = trace[start]
        if inputs[start].shape[:1] == tensors[last].shape[:1]:
            for key, row in zip(self._row_keys(args, kwargs), tensors[last].detach().clone().unbind(0)):
                self._store(key, row)

    def _store(self, key: bytes, row: torch.Tensor) -> None:
        """Keep ``row`` (a copy: code after the blocks may work in place) if the budget allows."""
        if key in self.rows:
            return
        moved = self.previous.pop(key, None)  # a row moving up frees its old self
        if moved is not None:
            self.nbytes -= _row_bytes(moved)
        if self.nbytes + _row_bytes(row) <= self.budget_bytes:
            self.rows[key] = row
            self.nbytes += _row_bytes(row)

    def disable(self, why: str, for_good: bool = False) -> None:
        """Stop serving and storing for the current frozen prefix (or ``for_good``), free the rows, warn why."""
        self.disabled, self._for_good = why, for_good
        self.clear()
        rank_zero_warn(f"ProgressiveFreezing: frozen outputs are not cached: {why}")
