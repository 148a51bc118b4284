"""Stand-ins for the tensorrt module and the CUDA interface, for checking what surrounds the
GPU calls (buffer slots, shapes, graph capture, the pipeline) on a machine without a GPU.

They keep the documented semantics the backend relies on, so a slip in it shows here:
work on a stream runs in submission order only when the stream is synchronized (so a host
buffer reused too early is read late); an execution context has no input shape until one is
set; ``execute_async_v3`` on a shape never run before fails inside graph capture (lazy
initialisation); a captured graph replays the shapes and addresses of capture time,
whatever the context holds later. The engine's arithmetic is ONNX Runtime running the ONNX
model whose bytes stand in for the plan.
"""

from __future__ import annotations

import types
from itertools import count

import numpy as np

from runtime.backends.plan import DeviceInfo

DEVICE = DeviceInfo("Fake GPU", (8, 7), 8 << 30)
VERSION = "10.3.0"


class _Stream:
    def __init__(self, handle: int):
        self.handle, self.queue, self.capture = handle, [], None


class FakeCuda:
    """The interface of runtime.backends.cuda over host memory."""

    name = "fake-cuda"

    def __init__(self) -> None:
        self.mem: dict[int, np.ndarray] = {}
        self.streams: dict[int, _Stream] = {}
        self.host: set[int] = set()
        self._ids = count(0x1000, 0x1000)
        self.graphs: set[int] = set()
        self.launches = self.captures = 0
        self.clock_ms = 0.0  # each copy or engine run takes 1 ms of device time
        self.closed = False

    def device_info(self, index: int = 0) -> DeviceInfo:
        return DEVICE

    def malloc(self, nbytes: int) -> int:
        ptr = next(self._ids)
        self.mem[ptr] = np.zeros(nbytes, np.uint8)
        return ptr

    def free(self, ptr: int) -> None:
        del self.mem[ptr]

    def host_empty(self, shape, dtype) -> np.ndarray:
        arr = np.empty(shape, dtype)
        self.host.add(id(arr))
        return arr

    def host_free(self, arr: np.ndarray) -> None:
        self.host.remove(id(arr))

    def stream(self) -> _Stream:
        s = _Stream(next(self._ids))
        self.streams[s.handle] = s
        return s

    def stream_handle(self, stream: _Stream) -> int:
        return stream.handle

    def destroy_stream(self, stream: _Stream) -> None:
        assert not stream.queue, "stream destroyed with work pending"
        del self.streams[stream.handle]

    def enqueue(self, handle: int, op) -> None:
        s = self.streams[handle]
        (s.capture if s.capture is not None else s.queue).append(op)

    def htod_async(self, dst: int, src: np.ndarray, stream: _Stream) -> None:
        def op():
            raw = src.reshape(-1).view(np.uint8)
            self.mem[dst][: raw.size] = raw
            self.clock_ms += 1
        self.enqueue(stream.handle, op)

    def dtoh_async(self, dst: np.ndarray, src: int, stream: _Stream) -> None:
        def op():
            raw = dst.reshape(-1).view(np.uint8)
            raw[:] = self.mem[src][: raw.size]
            self.clock_ms += 1
        self.enqueue(stream.handle, op)

    def synchronize(self, stream: _Stream) -> None:
        assert stream.capture is None, "synchronize inside graph capture"
        while stream.queue:
            stream.queue.pop(0)()

    def event(self) -> list:
        return [0.0]

    def record(self, event: list, stream: _Stream) -> None:
        def op():
            event[0] = self.clock_ms
        self.enqueue(stream.handle, op)

    def elapsed_ms(self, start: list, end: list) -> float:
        return end[0] - start[0]

    def begin_capture(self, stream: _Stream) -> None:
        stream.capture = []

    def end_capture(self, stream: _Stream) -> list:
        graph, stream.capture = stream.capture, None
        self.graphs.add(id(graph))
        self.captures += 1
        return graph

    def destroy_graph(self, graph: list) -> None:
        self.graphs.remove(id(graph))

    def launch(self, graph: list, stream: _Stream) -> None:
        assert id(graph) in self.graphs, "launch of a destroyed graph"
        self.launches += 1
        for op in graph:
            self.enqueue(stream.handle, op)

    def close(self) -> None:
        self.closed = True


class _Context:
    def __init__(self, engine: _Engine):
        self.engine, self.shape, self.addr, self.profile = engine, None, {}, None
        self.ran: set[tuple] = set()

    def set_optimization_profile_async(self, index: int, stream_handle: int) -> bool:
        self.profile = index
        return True

    def set_input_shape(self, name: str, shape) -> bool:
        lo, _, hi = self.engine.get_tensor_profile_shape(name, 0)
        if name != self.engine.input or not all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
            return False
        self.shape = tuple(shape)
        return True

    def infer_shapes(self) -> list[str]:
        return [] if self.shape else [self.engine.input]

    def get_tensor_shape(self, name: str) -> tuple:
        n, _, h, w = self.shape
        return (n, self.engine.classes, h, w) if name == self.engine.output else self.shape

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.addr[name] = ptr
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        e, cuda = self.engine, self.engine.cuda
        if self.profile is None or self.infer_shapes() or set(self.addr) != {e.input, e.output}:
            return False
        stream = cuda.streams[stream_handle]
        if stream.capture is not None and self.shape not in self.ran:
            return False  # the first run of a shape initialises lazily, which capture forbids
        shape, d_in, d_out = self.shape, self.addr[e.input], self.addr[e.output]

        def op():
            x = cuda.mem[d_in][: int(np.prod(shape)) * 4].view(np.float32).reshape(shape)
            y = np.ascontiguousarray(e.session.run(None, {e.input: x})[0], np.float32).reshape(-1).view(np.uint8)
            cuda.mem[d_out][: y.size] = y
            cuda.clock_ms += 1
        cuda.enqueue(stream_handle, op)
        self.ran.add(shape)
        return True


class _Engine:
    def __init__(self, onnx_bytes: bytes, profile: tuple[int, int, int], cuda: FakeCuda):
        import onnxruntime as ort

        self.session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
        i, o = self.session.get_inputs()[0], self.session.get_outputs()[0]
        self.input, self.output = i.name, o.name
        self.chw = tuple(i.shape[1:])
        self.classes = o.shape[1]
        self.profile, self.cuda = profile, cuda
        self.num_io_tensors = 2

    def get_tensor_name(self, i: int) -> str:
        return (self.input, self.output)[i]

    def get_tensor_mode(self, name: str) -> str:
        return "input" if name == self.input else "output"

    def get_tensor_dtype(self, name: str):
        return np.float32

    def get_tensor_profile_shape(self, name: str, index: int) -> list[tuple]:
        if name != self.input or index != 0:
            raise ValueError("profile shapes exist for inputs of profile 0 only")
        return [(b, *self.chw) for b in self.profile]

    def create_execution_context(self) -> _Context:
        return _Context(self)


def fake_tensorrt(cuda: FakeCuda, profile: tuple[int, int, int]) -> types.ModuleType:
    """A module with the few tensorrt names the backend uses; plans are ONNX bytes."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = VERSION

    class Logger:
        WARNING = 2

        def __init__(self, level=WARNING):
            self.level = level

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, plan: bytes):
            return _Engine(plan, profile, cuda)

    trt.Logger, trt.Runtime = Logger, Runtime
    trt.TensorIOMode = types.SimpleNamespace(INPUT="input", OUTPUT="output")
    trt.nptype = lambda dt: dt
    return trt
