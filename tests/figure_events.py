"""Reading a run's TensorBoard events back: figures (images) with their sizes and steps, histograms,
and the progress bar's entries, for the figure tests of every technique."""

from __future__ import annotations

import io
import os
from typing import Optional

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

MIN_WIDTH, MIN_HEIGHT = 600, 400


def events_of(log_dir: str) -> EventAccumulator:
    events = EventAccumulator(log_dir, size_guidance={"images": 0, "histograms": 0, "tensors": 0, "scalars": 0})
    events.Reload()
    return events


def figure_steps(events: EventAccumulator, tag: str) -> list[int]:
    """The steps at which figure ``tag`` was written; asserts each is at least 600×400 pixels."""
    assert tag in events.Tags()["images"], f"no figure {tag!r}; images: {events.Tags()['images']}"
    steps = []
    for image in events.Images(tag):
        assert image.width >= MIN_WIDTH and image.height >= MIN_HEIGHT, (tag, image.width, image.height)
        steps.append(image.step)
    return steps


def histogram_steps(events: EventAccumulator, tag: str) -> list[int]:
    assert tag in events.Tags()["histograms"], f"no histogram {tag!r}; histograms: {events.Tags()['histograms']}"
    return [h.step for h in events.Histograms(tag)]


def save_figure(events: EventAccumulator, tag: str, path: str, index: int = -1) -> None:
    """Write the ``index``-th picture of ``tag`` as a PNG (to look at it, or for a method card)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "wb") as file:
        file.write(events.Images(tag)[index].encoded_image_string)


def figure_dir() -> Optional[str]:
    """Where figure tests also save their last pictures: ``$LIT_EFFICIENT_FIGURES`` (unset: nowhere)."""
    return os.environ.get("LIT_EFFICIENT_FIGURES") or None


def keep_figure(events: EventAccumulator, tag: str, name: str, index: int = -1) -> None:
    """Save the ``index``-th (default: last) picture of ``tag`` as ``<figure_dir>/<name>.png`` when
    figures are asked for."""
    folder = figure_dir()
    if folder is not None:
        save_figure(events, tag, os.path.join(folder, f"{name}.png"), index)


def image_bytes(events: EventAccumulator, tag: str, index: int = -1) -> io.BytesIO:
    return io.BytesIO(events.Images(tag)[index].encoded_image_string)
