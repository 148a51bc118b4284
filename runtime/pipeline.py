"""The streaming whole-volume pipeline.

Per volume: a producer thread preprocesses slice batches (runtime.preprocess.SliceBatcher,
each slice preprocessed once) into a bounded queue while the backend infers; another thread
brings each batch's logits back to the scan's grid and argmaxes them straight into a
preallocated uint8 mask (and can hand the finished slices on, for example to label connected
components while inference goes on), so peak memory is the volume, its mask and a few
batches, never slices x classes x full-resolution logits. Across volumes, the next volume is
read while the current one is inferred, postprocessed and written.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .dicom import is_series_path, read_input
from .io import Arrival, Volume, check_ct, read_volume
from .preprocess import SliceBatcher, logits_to_labels, logits_to_probabilities, slice_grid
from .spec import ModelSpec

if TYPE_CHECKING:
    from .backends.base import Backend

STAGES = ("read", "preprocess", "infer", "postprocess", "write")


@dataclass
class Timings:
    """Seconds spent in each stage's own work, plus the wall time of the whole volume."""

    stages: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    wall: float = 0.0
    slices: int = 0

    def add(self, stage: str, seconds: float) -> None:
        self.stages[stage] += seconds

    def as_dict(self) -> dict:
        return {**{k: round(v, 4) for k, v in self.stages.items()}, "wall": round(self.wall, 4), "slices": self.slices}


class _Timer:
    def __init__(self, t: Timings, stage: str):
        self.t, self.stage = t, stage

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.t.add(self.stage, time.perf_counter() - self.start)


@dataclass
class SegmentOptions:
    """How segment_canonical runs and where its results go; every field is optional.

    ``batch_size`` slices per batch; ``timings`` collects the stages' seconds; ``progress(n)`` is
    called as slices finish; ``queue_depth`` preprocessed batches wait at most. ``probabilities``
    (a (C, slices, rows, cols) uint8 array) is filled with the class probabilities x 255. With an
    ``arrival`` (a volume still being read), each batch waits for its slices, and batches run in
    the order the slices arrive. ``out`` (uint8, the volume's shape) receives the labels if given;
    ``on_final(start, stop)`` is called once those slices' labels are final
    (runtime.postprocess.StreamingComponents.add labels them then).
    """

    batch_size: int = 1
    timings: Timings | None = None
    progress: Callable[[int], None] | None = None
    queue_depth: int = 3
    probabilities: np.ndarray | None = None
    arrival: Arrival | None = None
    out: np.ndarray | None = None
    on_final: Callable[[int, int], None] | None = None


def segment_canonical(
    volume: np.ndarray,
    spacing: tuple[float, float, float],
    spec: ModelSpec,
    model: Backend | Callable[[np.ndarray], np.ndarray],
    options: SegmentOptions | None = None,
) -> np.ndarray:
    """Canonical HU volume -> uint8 labels on the same grid, preprocessing in a producer thread.

    ``model`` is a backend or a function from a batch to its logits. Batches go through a
    backend's submit/collect with up to ``backend.in_flight`` batches running at once
    (TensorRT's double buffering, ONNX Runtime's CPU streams) and ``backend.queued`` more
    waiting for a free stream; a function is simply called. See SegmentOptions for the rest.
    """
    o = options or SegmentOptions()
    batch_size, progress, probabilities, arrival, on_final = (
        o.batch_size,
        o.progress,
        o.probabilities,
        o.arrival,
        o.on_final,
    )
    backend = model if hasattr(model, "submit") and hasattr(model, "collect") else None
    infer = None if backend is not None else model
    t = o.timings or Timings()
    pre = spec.preprocess
    grid = slice_grid(volume.shape[1:], spacing[1:], pre)
    out = np.empty(volume.shape, dtype=np.uint8) if o.out is None else o.out
    q: queue.Queue = queue.Queue(maxsize=o.queue_depth)
    stop = threading.Event()
    n = volume.shape[0]
    submit = backend.submit if backend is not None else infer
    collect = backend.collect if backend is not None else (lambda token: token)
    in_flight = max(1, backend.in_flight) + backend.queued if backend is not None else 1

    batcher = SliceBatcher(volume, spacing, pre, grid)

    starts = range(0, n, batch_size)
    if arrival is not None and arrival.from_end:
        starts = starts[::-1]
    k = pre.context

    def produce() -> None:
        try:
            for start in starts:
                if stop.is_set():
                    return
                if arrival is not None:
                    arrival.wait(max(0, start - k), min(n, start + batch_size + k))
                s = time.perf_counter()
                batch = batcher(start, min(start + batch_size, n))
                t.add("preprocess", time.perf_counter() - s)
                q.put((start, batch))
            q.put(None)
        except BaseException as exc:  # hand the error to the consumer
            q.put(exc)

    def place(start: int, count: int, logits: np.ndarray) -> None:
        with _Timer(t, "postprocess"):
            out[start : start + count] = logits_to_labels(logits, grid, spec.io.activation)
            if probabilities is not None:
                probabilities[:, start : start + count] = logits_to_probabilities(logits, grid, spec.io.activation)
        if on_final:
            with _Timer(t, "postprocess"):
                on_final(start, start + count)
        t.slices += count
        if progress:
            progress(count)

    # batches are brought back to the scan's grid in a thread, so the next batch is submitted
    # at once; at most two batches of logits wait there
    placing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="postprocess")
    placed: deque[Future] = deque()

    def finish(job) -> None:
        start, count, token = job
        with _Timer(t, "infer"):
            logits = collect(token)
        while len(placed) >= 2:
            placed.popleft().result()
        placed.append(placing.submit(place, start, count, logits))

    producer = threading.Thread(target=produce, name="preprocess", daemon=True)
    producer.start()
    pending: deque = deque()
    try:
        while True:
            item = q.get()
            if isinstance(item, BaseException):
                raise item
            if item is None:
                break
            start, batch = item
            with _Timer(t, "infer"):
                token = submit(batch)
            pending.append((start, len(batch), token))
            while len(pending) >= in_flight:  # keep the rest running while the next is prepared
                finish(pending.popleft())
        while pending:
            finish(pending.popleft())
        while placed:
            placed.popleft().result()
    finally:
        stop.set()
        placing.shutdown(wait=True, cancel_futures=True)  # nothing writes into out after we return
        while producer.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                producer.join(0.01)
    return out


def read_any(
    path: Path, on_open: Callable[[Volume], None] | None = None, force: bool = False, ct: bool = False
) -> Volume:
    """The default reader: a DICOM series (runtime.dicom) or a NIfTI file (runtime.io.read_volume),
    with the plausibility checks: ``force`` lets them through, ``ct`` adds the not-CT check."""
    if not is_series_path(path):
        return read_volume(path, on_open=on_open, force=force, ct=ct)
    vol = read_input(path)
    if ct:
        check_ct(vol, force)
    if on_open is not None:
        on_open(vol)
    return vol


def read_ahead(
    paths: Iterable[Path], reader: Callable[..., Volume] | None = None
) -> Iterator[tuple[Path, Future, Future]]:
    """Yield (path, opened, done) with the next volume already being read in a thread.

    ``opened`` gives the volume as soon as it can be used, maybe while its slices still
    arrive (runtime.io.read_volume's ``on_open``); ``done`` gives (seconds spent reading,
    perf_counter time the read began) once every voxel is in, or the read's error.
    """
    paths = list(paths)
    read = reader or read_any
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="read") as pool:

        def timed(p: Path, opened: Future):
            s = time.perf_counter()
            try:
                read(p, on_open=opened.set_result)
            except BaseException as exc:
                if not opened.done():
                    opened.set_exception(exc)
                raise
            return time.perf_counter() - s, s

        def submit(p: Path) -> tuple[Future, Future]:
            opened: Future = Future()
            return opened, pool.submit(timed, p, opened)

        futures = [submit(paths[0])] if paths else []
        for i, p in enumerate(paths):
            if i + 1 < len(paths):
                futures.append(submit(paths[i + 1]))
            yield p, *futures[i]
            futures[i] = None  # let the volume be freed once the caller is done with it
