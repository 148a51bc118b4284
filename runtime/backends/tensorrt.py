"""TensorRT backend: a plan plus its sidecar, run with execute_async_v3 on CUDA streams.

Every TensorRT runtime call of the project lives in this module. It uses only APIs present
in TensorRT 10.x (JetPack 6 ships 10.3) and 11.x: the name-based tensor API,
``set_input_shape``/``infer_shapes``, ``set_tensor_address`` and ``execute_async_v3``.

Two buffer slots (pinned host + device memory sized for the profile's max batch, one stream
each) let ``submit`` enqueue batch i+1 (copy in, compute, copy out) while batch i is still
in flight; ``collect`` waits for one slot. Events around each step give the trtexec-style
split of host-to-device, compute and device-to-host time. Every I/O tensor of the engine gets
a device buffer; only the spec's output is copied back.

With CUDA graphs, a slot captures the enqueue of a batch shape the second time in a row it
runs that shape (the first run is a plain enqueue that also does TensorRT's lazy
initialisation, so no batch runs twice) and replays it while the shape stays; a shape change
(a volume's last, partial batch) drops the graph, because a graph freezes the shapes of its
capture. Captures are bounded per slot; a capture that fails ends as trtexec ends it and the
backend continues without graphs. ``graph_stats`` says what replayed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import TRT_HINT, InputError, SegError, require
from ..spec import ModelSpec
from .base import Backend
from .cuda import load_cuda
from .plan import BUFFER_SLOTS, check_plan, read_sidecar


class TensorRTBackend(Backend):
    name = "tensorrt"
    max_captures_per_slot = 64  # a bound on re-captures (each costs about one enqueue) in a long run

    def __init__(self, plan: str | Path, cuda_graph: bool = False):
        super().__init__()
        self.path = Path(plan)
        self.use_graph = cuda_graph
        self.graph_note = ""  # why graphs are off although asked for
        self.graph_stats = {"captures": 0, "replays": 0, "plain": 0, "capture_failures": 0}
        self.device_times_ms = {"h2d": 0.0, "compute": 0.0, "d2h": 0.0}
        self.device_bytes = 0  # I/O buffers plus the contexts' activation memory
        self._slots: list[dict] = []
        self._next = 0
        self.in_flight = BUFFER_SLOTS  # one batch per buffer slot

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
        if self.use_graph and not getattr(self.cuda, "can_capture", True):
            self.use_graph, self.graph_note = False, f"no CUDA graphs through {self.cuda.name}"

    def _dtype(self, trt, name: str) -> np.dtype:
        """numpy dtype of an engine tensor; BF16/FP8/INT4/FP4 have none (trt.nptype raises TypeError)."""
        dt = self.engine.get_tensor_dtype(name)
        try:
            return np.dtype(trt.nptype(dt))
        except TypeError:
            raise SegError(
                f"{self.path}: engine tensor {name!r} is {getattr(dt, 'name', dt)}, which numpy cannot hold; "
                "build the plan from a graph with float32 or float16 inputs and outputs "
                "(seg-export quantize keeps them float32)"
            ) from None

    def _open(self, trt, side: dict) -> None:
        """Deserialize the engine and allocate the two buffer slots."""
        cuda = self.cuda
        plan = self.path.read_bytes()
        check_plan(side, plan, trt.__version__, cuda.device_info(0), self.path.name)
        self.trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        del plan
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
                f"{self.path}: engine tensors {inputs} -> {outputs} do not match the spec ({io.input_name} -> "
                f"{io.output_name})"
            )
        self.in_name, self.out_name, self.outputs = io.input_name, io.output_name, outputs
        mn, opt, mx = (tuple(s) for s in self.engine.get_tensor_profile_shape(self.in_name, 0))
        # batches below the profile's minimum are padded with zeros, so any batch from 1 runs
        self.profile_min, self.default_batch, self.max_batch = mn[0], opt[0], mx[0]
        dtypes = {n: self._dtype(trt, n) for n in names}
        self.in_dtype, self.out_dtype = dtypes[self.in_name], dtypes[self.out_name]
        self.input_dtype = self.in_dtype
        for _ in range(BUFFER_SLOTS):
            slot: dict = {"graph": None, "graph_shape": None, "shape": None, "out_shape": None, "runs": 0}
            slot.update(events=[], d_out={}, captures=0)
            self._slots.append(slot)  # before allocating, so that release_impl frees a half-built slot
            # no local name for the context: a traceback keeping this frame alive would keep its memory
            slot["ctx"] = self.engine.create_execution_context()  # STATIC: its own activation memory
            slot["stream"] = cuda.stream()
            for _ in range(4):
                slot["events"].append(cuda.event())
            self._select_profile(slot["ctx"], slot["stream"])
            # size every output for the profile's max batch: the shapes TensorRT infers for it
            max_out = self._shapes(slot["ctx"], mx)
            slot["h_in"] = cuda.host_empty(mx, self.in_dtype)
            slot["h_out"] = cuda.host_empty(max_out[self.out_name], self.out_dtype)
            slot["d_in"] = cuda.malloc(slot["h_in"].nbytes)
            self.device_bytes += slot["h_in"].nbytes
            slot["ctx"].set_tensor_address(self.in_name, slot["d_in"])
            for name in outputs:  # execute_async_v3 fails unless every I/O tensor has an address
                nbytes = int(np.prod(max_out[name])) * dtypes[name].itemsize
                slot["d_out"][name] = cuda.malloc(nbytes)
                self.device_bytes += nbytes
                slot["ctx"].set_tensor_address(name, slot["d_out"][name])
            slot["shape"], slot["out_shape"] = tuple(mx), max_out[self.out_name]
        per_context = side.get("device_memory_bytes")
        self.device_bytes += BUFFER_SLOTS * int(per_context or 0)

    def _select_profile(self, ctx, stream) -> None:
        try:  # the binding raises instead of returning False (pyCore.cpp set_optimization_profile_async)
            ok = ctx.set_optimization_profile_async(0, self.cuda.stream_handle(stream))
        except RuntimeError as exc:
            raise SegError(f"{self.path}: TensorRT could not select the plan's optimisation profile: {exc}") from None
        if ok is False:
            raise SegError(f"{self.path}: TensorRT could not select the plan's optimisation profile")

    def _shapes(self, ctx, in_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        """Set the input shape and return every output's shape as TensorRT infers it."""
        if not ctx.set_input_shape(self.in_name, tuple(in_shape)):
            raise SegError(f"input shape {tuple(in_shape)} is outside the plan's optimisation profile")
        missing = ctx.infer_shapes()
        if missing:
            raise SegError(f"TensorRT input shapes not fully specified: {missing}")
        shapes = {n: tuple(int(d) for d in ctx.get_tensor_shape(n)) for n in self.outputs}
        unknown = [n for n, s in shapes.items() if any(d < 0 for d in s)]
        if unknown:
            raise SegError(
                f"{self.path}: engine outputs {unknown} have data-dependent shapes, which this backend does not run; "
                "export the model with static output shapes"
            )
        return shapes

    def details(self) -> list[str]:
        return [f"batch profile {self.profile_min}/{self.default_batch}/{self.max_batch}", *self._graph_words()]

    def _graph_words(self) -> list[str]:
        g = self.graph_stats
        if self.graph_note:
            return [self.graph_note]
        if not self.use_graph:
            return []
        if not g["replays"] and not g["plain"]:
            return ["CUDA graphs for repeated batch shapes"]
        return [
            f"CUDA graphs: {g['replays']} of {g['replays'] + g['plain']} batches replayed, {g['captures']} captures"
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
        self._next = (self._next + 1) % len(self._slots)
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
        self._run(slot)
        cuda.record(ev[2], s)
        out_shape = slot["out_shape"]
        h_out = slot["h_out"].reshape(-1)[: int(np.prod(out_shape))].reshape(out_shape)
        cuda.dtoh_async(h_out, slot["d_out"][self.out_name], s)
        cuda.record(ev[3], s)
        slot["out"] = h_out[:n]
        return slot

    def _run(self, slot: dict) -> None:
        """Replay the slot's graph, capture one for a shape run before, or enqueue plainly."""
        slot["runs"] += 1
        if self.use_graph and slot["graph"] is None and slot["runs"] > 1:
            if slot["captures"] < self.max_captures_per_slot:
                self._capture(slot)
        if self.use_graph and slot["graph"] is not None:
            self.cuda.launch(slot["graph"], slot["stream"])
            self.graph_stats["replays"] += 1
        else:
            self._enqueue(slot)
            self.graph_stats["plain"] += 1

    def _set_shape(self, slot: dict, shape: tuple[int, ...]) -> None:
        """Give the slot's context this input shape if it holds another. A graph captured at the
        old shape is dropped: a graph freezes the shapes of its capture, and TensorRT wants one
        plain enqueue after a shape change before the next capture."""
        if slot["shape"] == shape:
            return
        slot["out_shape"] = self._shapes(slot["ctx"], shape)[self.out_name]
        slot["shape"], slot["runs"] = shape, 0
        self._drop_graph(slot)

    def _drop_graph(self, slot: dict) -> None:
        if slot.get("graph") is not None:
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
        """Capture the enqueue of the slot's current shape as a CUDA graph (this shape already ran
        on this context, so TensorRT's lazy initialisation is done). If the enqueue fails inside
        the capture, end the capture as trtexec does and go on without graphs."""
        cuda, s = self.cuda, slot["stream"]
        cuda.begin_capture(s)
        try:
            self._enqueue(slot)
        except SegError as exc:
            cuda.end_capture_on_error(s)
            self.graph_stats["capture_failures"] += 1
            self.use_graph, self.graph_note = False, f"no CUDA graphs: capture failed ({exc})"
            return
        except BaseException:
            cuda.end_capture_on_error(s)
            raise
        slot["graph"] = cuda.end_capture(s)
        slot["captures"] += 1
        self.graph_stats["captures"] += 1

    def infer_impl(self, batch: np.ndarray) -> np.ndarray:
        return self.collect(self.submit(batch))

    def release_impl(self) -> None:
        cuda = self.cuda
        for slot in self._slots:
            if "stream" in slot:
                cuda.synchronize(slot["stream"])  # a failed run may leave copies in flight
            self._drop_graph(slot)
            slot.pop("ctx", None)  # the context's activation memory goes with it
            for ptr in slot["d_out"].values():
                cuda.free(ptr)
            for key, free in (
                ("d_in", cuda.free),
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
