"""The backend lifecycle, in the style of Polygraphy's runners: activate, infer, release.

A backend builds its heavy resources (sessions, engines, device buffers) in ``activate``,
runs ``infer(batch) -> logits`` while active, and frees them in ``release``. It declares
its batch limits, input dtype and how many batches it can have in flight at once
(``submit``/``collect``), and is usable as a context manager.
"""

from __future__ import annotations

import functools
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from ..errors import SegError
from ..spec import ModelSpec


class Backend:
    name = "backend"

    def __init__(self) -> None:
        self.is_active = False
        self.spec: ModelSpec | None = None
        self.min_batch = 1
        self.max_batch: int | None = None  # None: no limit
        self.default_batch = 4
        self.input_dtype = np.float32
        self.in_flight = 1  # batches that run at once
        self.queued = 0  # further batches the pipeline may submit ahead, waiting for a free stream
        self.provider = ""

    @functools.cached_property
    def model_sha256(self) -> str | None:
        """sha256 of the model file (None for a model served elsewhere), hashed once per backend:
        a cluster actor segments many volumes with one backend."""
        from ..models import file_sha256

        path = getattr(self, "path", None)
        return file_sha256(path) if path else None

    # the lifecycle --------------------------------------------------------------------
    def activate(self) -> Backend:
        if self.is_active:
            raise SegError(f"{self.name} backend is already active")
        self.activate_impl()
        self.is_active = True
        return self

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """(n, C, H, W) float32 model input -> (n, K, H, W) float32 logits."""
        if not self.is_active:
            raise SegError(f"{self.name} backend used before activate()")
        n = batch.shape[0]
        if n < self.min_batch or (self.max_batch is not None and n > self.max_batch):
            raise SegError(f"batch of {n} slices is outside this model's range {self.min_batch}..{self.max_batch}")
        return self.infer_impl(np.ascontiguousarray(batch, dtype=self.input_dtype))

    def submit(self, batch: np.ndarray):
        """Start inference on a batch; ``collect`` returns its logits. Synchronous by default;
        backends with ``in_flight`` > 1 (TensorRT's buffer slots, ONNX Runtime's CPU streams)
        run up to that many submitted batches at once, collected in submission order."""
        return self.infer(batch)

    def collect(self, token) -> np.ndarray:
        return token

    def release(self) -> None:
        if self.is_active:
            self.release_impl()
            self.is_active = False

    def __enter__(self) -> Backend:
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.release()

    # what subclasses implement -----------------------------------------------------------
    def activate_impl(self) -> None:
        raise NotImplementedError

    def infer_impl(self, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def release_impl(self) -> None:
        pass

    @property
    def precision(self) -> str:
        return self.spec.precision if self.spec else "unknown"

    def describe(self) -> str:
        """One line for logs: name, provider and details in brackets, precision."""
        inside = ", ".join(x for x in (self.provider, *self.details()) if x)
        return f"{self.name}{f' ({inside})' if inside else ''}, {self.precision}"

    def details(self) -> list[str]:
        """What ``describe`` adds after the provider; backends with settings worth logging override it."""
        return []


class PooledBackend(Backend):
    """A backend that runs several batches at once on a thread pool (ONNX Runtime's CPU
    streams, Triton's requests in flight): ``submit`` hands a batch to the pool, ``collect``
    waits for it; without a pool, batches run one at a time in the caller's thread."""

    def __init__(self) -> None:
        super().__init__()
        self._pool: ThreadPoolExecutor | None = None

    def start_pool(self, workers: int, prefix: str) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=prefix)

    def submit(self, batch: np.ndarray):
        if self._pool is None:
            return self.infer(batch)
        return self._pool.submit(self.infer, batch)

    def collect(self, token) -> np.ndarray:
        return token.result() if isinstance(token, Future) else token

    def stop_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
