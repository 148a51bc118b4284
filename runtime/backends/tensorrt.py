"""TensorRT backend: a plan plus its sidecar, run with execute_async_v3 on CUDA streams.

Every TensorRT runtime call of the project lives in this module. It uses only APIs present
in TensorRT 10.x (JetPack 6 ships 10.3) and 11.x: the name-based tensor API,
``set_input_shape``/``infer_shapes``, ``set_tensor_address`` and ``execute_async_v3``.

Two buffer slots (pinned host + device memory sized for the profile's max batch, one stream
each) let ``submit`` enqueue batch i+1 (copy in, compute, copy out) while batch i is still
in flight; ``collect`` waits for one slot. Events around each step give the trtexec-style
split of host-to-device, compute and device-to-host time. Optionally, the enqueue of the
steady-state batch size is captured per slot as a CUDA graph and replayed; a slot whose
context ran another batch size since (a volume's last, partial batch) captures again.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import TRT_HINT, InputError, SegError, require
from ..spec import ModelSpec
from .base import Backend
from .cuda import load_cuda
from .plan import check_plan, read_sidecar


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, plan: str | Path, cuda_graph: bool = False):
        super().__init__()
        self.path = Path(plan)
        self.use_graph = cuda_graph
        self.device_times_ms = {"h2d": 0.0, "compute": 0.0, "d2h": 0.0}
        self._slots: list[dict] = []
        self._next = 0
        self.in_flight = 2  # one batch per buffer slot

    def activate_impl(self) -> None:
        if not self.path.is_file():
            raise InputError(f"{self.path}: no such plan file")
        side = read_sidecar(self.path)
        self.spec = ModelSpec.from_dict(side["spec"])
        trt = require("tensorrt", "trt", "the TensorRT backend", TRT_HINT)
        self.cuda = load_cuda()
        try:
            self._open(trt, side)
        except BaseException:
            self.release_impl()  # what was allocated before the failure, and pycuda's context
            raise
        self.provider = self.cuda.name

    def _open(self, trt, side: dict) -> None:
        """Deserialize the engine and allocate the two buffer slots."""
        cuda = self.cuda
        plan = self.path.read_bytes()
        check_plan(side, plan, trt.__version__, cuda.device_info(0), self.path.name)
        self.trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise SegError(
                f"{self.path}: TensorRT could not deserialize the plan; rebuild it with seg-export build-engine"
            )
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        io = self.spec.io
        if inputs != [io.input_name] or io.output_name not in outputs:
            raise SegError(
                f"{self.path}: engine tensors {inputs} -> {outputs} do not match the spec ({io.input_name} -> {io.output_name})"
            )
        self.in_name, self.out_name = io.input_name, io.output_name
        mn, opt, mx = (tuple(s) for s in self.engine.get_tensor_profile_shape(self.in_name, 0))
        # batches below the profile's minimum are padded with zeros, so any batch from 1 runs
        self.profile_min, self.default_batch, self.max_batch = mn[0], opt[0], mx[0]
        c, h, w = mx[1:]
        k = self.spec.out_channels
        self.in_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.in_name)))
        self.out_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.out_name)))
        self.input_dtype = self.in_dtype
        for _ in range(2):
            slot: dict = {"graph": None, "shape": None, "out_shape": None, "events": []}
            self._slots.append(slot)  # before allocating, so that release_impl frees a half-built slot
            slot["ctx"] = ctx = self.engine.create_execution_context()
            slot["stream"] = stream = cuda.stream()
            slot["h_in"] = cuda.host_empty((mx[0], c, h, w), self.in_dtype)
            slot["h_out"] = cuda.host_empty((mx[0], k, h, w), self.out_dtype)
            for _ in range(4):
                slot["events"].append(cuda.event())
            slot["d_in"] = cuda.malloc(slot["h_in"].nbytes)
            slot["d_out"] = cuda.malloc(slot["h_out"].nbytes)
            ctx.set_optimization_profile_async(0, cuda.stream_handle(stream))
            ctx.set_tensor_address(self.in_name, slot["d_in"])
            ctx.set_tensor_address(self.out_name, slot["d_out"])

    def details(self) -> list[str]:
        return [
            f"batch profile {self.profile_min}/{self.default_batch}/{self.max_batch}",
            *(["CUDA graphs"] if self.use_graph else []),
        ]

    def _enqueue(self, slot: dict) -> None:
        ok = slot["ctx"].execute_async_v3(self.cuda.stream_handle(slot["stream"]))
        if not ok:
            raise SegError("TensorRT execute_async_v3 failed (see the TensorRT log above)")

    def submit(self, batch: np.ndarray):
        """Enqueue one batch on the next slot; returns a token for ``collect``."""
        n = batch.shape[0]
        if not 1 <= n <= self.max_batch:
            raise SegError(f"batch of {n} slices is outside the plan's profile {self.profile_min}..{self.max_batch}")
        slot = self._slots[self._next]
        self._next ^= 1
        cuda, s = self.cuda, slot["stream"]
        m = max(n, self.profile_min)
        self._set_shape(slot, (m, *batch.shape[1:]))
        h_in = slot["h_in"][:m]
        np.copyto(h_in[:n], batch, casting="same_kind")
        h_in[n:] = 0
        ev = slot["events"]
        cuda.record(ev[0], s)
        cuda.htod_async(slot["d_in"], h_in, s)
        cuda.record(ev[1], s)
        if self.use_graph and m == self.default_batch and slot["graph"] is None:
            self._capture(slot)
        if self.use_graph and slot["graph"] is not None:
            cuda.launch(slot["graph"], s)
        else:
            self._enqueue(slot)
        cuda.record(ev[2], s)
        out_shape = slot["out_shape"]
        h_out = slot["h_out"].reshape(-1)[: int(np.prod(out_shape))].reshape(out_shape)
        cuda.dtoh_async(h_out, slot["d_out"], s)
        cuda.record(ev[3], s)
        slot["out"] = h_out[:n]
        return slot

    def _set_shape(self, slot: dict, shape: tuple[int, ...]) -> None:
        """Give the slot's context this input shape if it holds another. A graph captured at the
        old shape is dropped: a graph freezes the shapes of its capture, and TensorRT wants one
        plain enqueue after a shape change before the next capture."""
        if slot["shape"] == shape:
            return
        ctx = slot["ctx"]
        if not ctx.set_input_shape(self.in_name, shape):
            raise SegError(f"input shape {shape} is outside the plan's optimisation profile")
        missing = ctx.infer_shapes()
        if missing:
            raise SegError(f"TensorRT input shapes not fully specified: {missing}")
        slot["shape"], slot["out_shape"] = shape, tuple(ctx.get_tensor_shape(self.out_name))
        self._drop_graph(slot)

    def _drop_graph(self, slot: dict) -> None:
        if slot["graph"] is not None:
            self.cuda.destroy_graph(slot["graph"])
            slot["graph"] = None

    def collect(self, slot) -> np.ndarray:
        cuda = self.cuda
        cuda.synchronize(slot["stream"])
        ev = slot["events"]
        for key, (a, b) in zip(("h2d", "compute", "d2h"), ((0, 1), (1, 2), (2, 3))):
            self.device_times_ms[key] += cuda.elapsed_ms(ev[a], ev[b])
        return np.array(slot["out"], dtype=np.float32, copy=True)

    def _capture(self, slot: dict) -> None:
        """Capture the enqueue as a CUDA graph after a warm-up run; fall back to plain enqueues."""
        cuda, s = self.cuda, slot["stream"]
        try:
            self._enqueue(slot)  # warm-up: lazy initialisation must not happen inside capture
            cuda.synchronize(s)
            cuda.begin_capture(s)
            try:
                self._enqueue(slot)
            finally:
                graph = cuda.end_capture(s)
            slot["graph"] = graph
        except SegError:
            slot["graph"], self.use_graph = None, False

    def infer_impl(self, batch: np.ndarray) -> np.ndarray:
        return self.collect(self.submit(batch))

    def release_impl(self) -> None:
        cuda = self.cuda
        for slot in self._slots:
            if "stream" in slot:
                cuda.synchronize(slot["stream"])  # a failed run may leave copies in flight
            self._drop_graph(slot)
            for key, free in (
                ("d_in", cuda.free),
                ("d_out", cuda.free),
                ("h_in", cuda.host_free),
                ("h_out", cuda.host_free),
                ("stream", cuda.destroy_stream),
            ):
                if key in slot:
                    free(slot[key])
            for event in slot["events"]:
                cuda.destroy_event(event)
        self._slots.clear()
        self.engine = self.runtime = None
        cuda.close()
