"""Stand-ins for the tensorrt module and the CUDA interface, for checking what surrounds the
GPU calls (buffer slots, shapes, graph capture, the pipeline) on a machine without a GPU.

They keep the documented semantics the backend relies on, so a slip in it shows here:
work on a stream runs in submission order only when the stream is synchronized (so a host
buffer reused too early is read late); an execution context has no input shape until one is
set; ``execute_async_v3`` on a shape never run before fails inside graph capture (lazy
initialisation); a captured graph replays the shapes and addresses of capture time,
whatever the context holds later. The builder checks the batch profile against the ONNX
model's static dimensions; the plan it writes holds the profile and the ONNX model, and the
engine's arithmetic is ONNX Runtime running that model.
"""

from __future__ import annotations

import json
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


PLAN_MAGIC = b"FAKEPLAN\n"


def fake_plan_bytes(onnx_bytes: bytes, profile: tuple[int, int, int]) -> bytes:
    """What the fake builder writes: the batch profile, then the ONNX model."""
    return PLAN_MAGIC + json.dumps({"profile": list(profile)}).encode() + b"\n" + onnx_bytes


class _Engine:
    def __init__(self, plan: bytes, cuda: FakeCuda | None):
        import onnxruntime as ort

        head, onnx_bytes = plan[len(PLAN_MAGIC):].split(b"\n", 1)
        self.session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
        i, o = self.session.get_inputs()[0], self.session.get_outputs()[0]
        self.input, self.output = i.name, o.name
        self.chw = tuple(i.shape[1:])
        self.classes = o.shape[1]
        self.profile, self.cuda = tuple(json.loads(head)["profile"]), cuda
        self.num_io_tensors = 2
        self.device_memory_size_v2 = 3 << 20

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


class _ParserError:
    def __init__(self, desc: str):
        self._desc = desc

    def code(self) -> int:
        return 1

    def desc(self) -> str:
        return self._desc

    def node(self) -> int:
        return 0

    def node_name(self) -> str:
        return "conv0"

    def node_operator(self) -> str:
        return "Conv"


class _Network:
    def __init__(self, flags: int):
        self.flags, self.onnx, self.input = flags, None, None


class _Parser:
    reject: str | None = None  # set by a test: the parser fails with this description

    def __init__(self, network: _Network, logger):
        self.network, self.errors = network, []

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, i: int) -> _ParserError:
        return self.errors[i]

    def parse(self, data: bytes, path: str | None = None) -> bool:
        import onnx

        if self.reject:
            self.errors.append(_ParserError(self.reject))
            return False
        model = onnx.load_from_string(data)
        self.network.onnx, self.network.input = data, model.graph.input[0]
        return True


class _Profile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, name: str, lo, opt, hi) -> None:
        if not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):
            raise ValueError("min <= opt <= max violated")
        self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))


class _TimingCache:
    def __init__(self, data: bytes):
        self.data = data

    def serialize(self) -> bytes:
        return self.data


class _Config:
    def __init__(self):
        self.profiles, self.flags, self.pools, self.cache = [], [], {}, None
        self.builder_optimization_level = 3

    def set_flag(self, flag) -> None:
        self.flags.append(flag)

    def set_memory_pool_limit(self, pool, size: int) -> None:
        self.pools[pool] = size

    def add_optimization_profile(self, profile: _Profile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, data: bytes) -> _TimingCache:
        return _TimingCache(bytes(data))

    def set_timing_cache(self, cache: _TimingCache, ignore_mismatch: bool) -> bool:
        self.cache = cache
        return True

    def get_timing_cache(self) -> _TimingCache:
        return self.cache


def fake_tensorrt(cuda: FakeCuda | None = None, version: str = VERSION) -> types.ModuleType:
    """A module with the tensorrt names the project uses, as ``version`` has them (11.x has no
    EXPLICIT_BATCH flag and no precision builder flags). Builds records what they were given
    in ``trt.builds``; plans are ``fake_plan_bytes``."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.builds = []
    v11 = int(version.split(".")[0]) >= 11

    class Logger:
        WARNING, VERBOSE = 2, 4

        def __init__(self, level=WARNING):
            self.level = level

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, plan: bytes):
            return _Engine(bytes(plan), cuda) if bytes(plan).startswith(PLAN_MAGIC) else None

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags: int = 0) -> _Network:
            return _Network(flags)

        def create_builder_config(self) -> _Config:
            return _Config()

        def create_optimization_profile(self) -> _Profile:
            return _Profile()

        def build_serialized_network(self, network: _Network, config: _Config):
            import onnx

            trt.builds.append({"network": network, "config": config})
            name = network.input.name
            dims = [d.dim_value or None for d in network.input.type.tensor_type.shape.dim]
            if len(config.profiles) != 1 or name not in config.profiles[0].shapes:
                return None
            lo, opt, hi = config.profiles[0].shapes[name]
            if any(d is not None and d != x for shape in (lo, opt, hi) for d, x in zip(dims[1:], shape[1:])):
                return None  # a profile that contradicts the model's static dimensions
            if config.cache is not None:
                config.cache = _TimingCache(config.cache.data + b"+")
            onnx.load_from_string(network.onnx)
            return fake_plan_bytes(network.onnx, (lo[0], opt[0], hi[0]))

    flags = {"STRONGLY_TYPED": 1} if v11 else {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1}
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(**flags)
    trt.BuilderFlag = types.SimpleNamespace(TF32=1) if v11 else types.SimpleNamespace(TF32=1, FP16=2, INT8=3)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE=0)
    trt.Logger, trt.Runtime, trt.Builder, trt.OnnxParser = Logger, Runtime, Builder, _Parser
    trt.TensorIOMode = types.SimpleNamespace(INPUT="input", OUTPUT="output")
    trt.nptype = lambda dt: dt
    return trt
