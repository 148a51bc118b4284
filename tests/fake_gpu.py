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

Each modelled behaviour names, beside it, the header or document it comes from: NvInfer.h
and python/docstrings/infer/pyCoreDoc.h, python/src/infer/pyCore.cpp and the bindings'
``tensorrt/__init__.py`` (NVIDIA/TensorRT, release/10.3 and main = 11.x); trtexec's
samples/common/sampleDevice.h; CUDA's driver_types.h and the CUDA Runtime API reference;
cuda-bindings' release notes (12.9.1, 13.0.0); pycuda's doc/driver.rst.
"""

from __future__ import annotations

import ctypes
import json
import types
import warnings
from itertools import count

import numpy as np

from runtime.backends.plan import DeviceInfo

DEVICE = DeviceInfo("Fake GPU", (8, 7), 8 << 30)
VERSION = "10.3.0"


class _Stream:
    def __init__(self, handle: int):
        self.handle, self.queue, self.capture = handle, [], None


class Device:
    """What both fakes share: memory at real host addresses (so pointers handed around are
    real), streams whose work runs at synchronize, and graph capture."""

    def __init__(self) -> None:
        self.buffers: dict[int, ctypes.Array] = {}
        self.streams: dict[int, _Stream] = {}
        self.graphs: set[int] = set()  # executable graphs (cudaGraphExec_t)
        self.captured: set[int] = set()  # captured, not yet destroyed graphs (cudaGraph_t)
        self.events: set[int] = set()
        self._handles = count(0x1000)
        self.launches = self.captures = self.engine_runs = 0
        self.clock_ms = 0.0  # each copy or engine run takes 1 ms of device time
        # cudaGetLastError returns and resets the last error of a runtime call (CUDA Runtime API, Error Handling)
        self.last_error = 0

    def alloc(self, nbytes: int) -> int:
        buf = ctypes.create_string_buffer(max(int(nbytes), 1))
        self.buffers[ctypes.addressof(buf)] = buf
        return ctypes.addressof(buf)

    def free(self, ptr: int) -> None:
        del self.buffers[int(ptr)]

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        for ptr in (dst, src):  # a copy past the end of a device allocation is an error on a GPU, not a write
            if ptr in self.buffers:
                assert nbytes <= len(self.buffers[ptr]), (
                    f"copy of {nbytes} bytes into a {len(self.buffers[ptr])}-byte buffer"
                )
        ctypes.memmove(dst, src, nbytes)
        self.clock_ms += 1

    def new_stream(self) -> int:
        s = _Stream(next(self._handles))
        self.streams[s.handle] = s
        return s.handle

    def destroy_stream(self, handle: int) -> None:
        assert not self.streams[handle].queue, "stream destroyed with work pending"
        del self.streams[handle]

    def capturing(self, handle: int) -> bool:
        return self.streams[handle].capture is not None

    def enqueue(self, handle: int, op) -> None:
        s = self.streams[handle]
        (s.capture if s.capture is not None else s.queue).append(op)

    def synchronize(self, handle: int) -> None:
        s = self.streams[handle]
        assert s.capture is None, "synchronize inside graph capture"
        while s.queue:
            s.queue.pop(0)()

    def begin_capture(self, handle: int) -> None:
        self.streams[handle].capture = []
        self.streams[handle].invalidated = False

    def invalidate_capture(self, handle: int) -> None:
        """A forbidden call during capture invalidates it (cudaErrorStreamCaptureInvalidated, driver_types.h)."""
        self.streams[handle].invalidated = True

    def end_capture(self, handle: int) -> list | None:
        """The captured work, or None when the capture was invalidated (cudaStreamEndCapture then
        returns cudaErrorStreamCaptureInvalidated and no graph; trtexec's sampleDevice.h)."""
        s = self.streams[handle]
        graph, s.capture = s.capture, None
        if getattr(s, "invalidated", False):
            self.last_error = 901
            return None
        self.captured.add(id(graph))
        self.captures += 1
        return graph

    def destroy_captured(self, graph: list) -> None:
        self.captured.remove(id(graph))

    def instantiate(self, graph: list) -> list:
        assert id(graph) in self.captured, "instantiate of a destroyed graph"
        exec_graph = list(graph)  # the executable graph keeps the captured work
        self.graphs.add(id(exec_graph))
        return exec_graph

    def destroy_graph(self, graph: list) -> None:
        self.graphs.remove(id(graph))

    def launch(self, graph: list, handle: int) -> None:
        assert id(graph) in self.graphs, "launch of a destroyed graph"
        self.launches += 1
        for op in graph:
            self.enqueue(handle, op)

    def new_event(self) -> list:
        event = [0.0]  # the device time it was reached at
        self.events.add(id(event))
        return event

    def destroy_event(self, event: list) -> None:
        self.events.remove(id(event))

    def record(self, event: list, handle: int) -> None:
        def op():
            event[0] = self.clock_ms

        self.enqueue(handle, op)

    def idle(self) -> bool:
        """Nothing allocated, no stream, event or graph left."""
        return not self.buffers and not self.streams and not self.graphs and not self.captured and not self.events


class FakeCuda:
    """The interface of runtime.backends.cuda (CudaPython, PyCuda) over a fake Device."""

    name = "fake-cuda"
    can_capture = True

    def __init__(self, device: Device | None = None) -> None:
        self.dev = device or Device()
        self.host: set[int] = set()
        self.closed = False

    def device_info(self, index: int = 0) -> DeviceInfo:
        return DEVICE

    def malloc(self, nbytes: int) -> int:
        return self.dev.alloc(nbytes)

    def free(self, ptr: int) -> None:
        self.dev.free(ptr)

    def host_empty(self, shape, dtype) -> np.ndarray:
        arr = np.empty(shape, dtype)
        self.host.add(id(arr))
        return arr

    def host_free(self, arr: np.ndarray) -> None:
        self.host.remove(id(arr))

    def stream(self) -> int:
        return self.dev.new_stream()

    def stream_handle(self, stream: int) -> int:
        return stream

    def destroy_stream(self, stream: int) -> None:
        self.dev.destroy_stream(stream)

    def htod_async(self, dst: int, src: np.ndarray, stream: int) -> None:
        self.dev.enqueue(stream, lambda: self.dev.copy(dst, src.ctypes.data, src.nbytes))

    def dtoh_async(self, dst: np.ndarray, src: int, stream: int) -> None:
        self.dev.enqueue(stream, lambda: self.dev.copy(dst.ctypes.data, src, dst.nbytes))

    def synchronize(self, stream: int) -> None:
        self.dev.synchronize(stream)

    def event(self) -> list:
        return self.dev.new_event()

    def destroy_event(self, event: list) -> None:
        self.dev.destroy_event(event)

    def record(self, event: list, stream: int) -> None:
        self.dev.record(event, stream)

    def elapsed_ms(self, start: list, end: list) -> float:
        return end[0] - start[0]

    def begin_capture(self, stream: int) -> None:
        self.dev.begin_capture(stream)

    def end_capture(self, stream: int) -> list:
        graph = self.dev.end_capture(stream)
        assert graph is not None, "end_capture on an invalidated capture"
        exec_graph = self.dev.instantiate(graph)
        self.dev.destroy_captured(graph)
        return exec_graph

    def end_capture_on_error(self, stream: int) -> None:
        graph = self.dev.end_capture(stream)
        if graph is not None:
            self.dev.destroy_captured(graph)
        self.dev.last_error = 0

    def destroy_graph(self, graph: list) -> None:
        self.dev.destroy_graph(graph)

    def launch(self, graph: list, stream: int) -> None:
        self.dev.launch(graph, stream)

    def close(self) -> None:
        self.closed = True


class _Handle:
    """A cuda-python handle type (cudaStream_t, cudaGraph_t, ...): an object whose address
    ``cuda.bindings.utils.get_cuda_native_handle`` returns; ``int(handle)`` still works but is
    deprecated since cuda-bindings 12.9.1 (release notes: "Using int(cuda_obj) ... is deprecated")."""

    def __init__(self, value: int):
        self.value = value

    def __int__(self) -> int:
        warnings.warn("int(cuda_obj) is deprecated; use get_cuda_native_handle", DeprecationWarning, stacklevel=2)
        return self.value

    __index__ = __int__


def get_cuda_native_handle(obj) -> int:
    """cuda.bindings.utils.get_cuda_native_handle: TypeError for a type it does not know."""
    if not isinstance(obj, _Handle):
        raise TypeError("Unknown type: " + str(type(obj)))
    return obj.value


def _raw(x) -> int:
    return x.value if isinstance(x, _Handle) else int(x)


def fake_cudart(device: Device, fail: dict[str, int] | None = None, driver_version: int = 12080) -> types.ModuleType:
    """cuda-python's runtime module (``cuda.bindings.runtime``) as the project calls it: every
    call returns a tuple whose first element is the error code (0: success), results after
    it; ``fail`` maps a function name to the error code it returns instead. ``driver_version``
    is what cudaDriverGetVersion reports (1000 * major + 10 * minor; 0 when no driver loads)."""
    rt = types.ModuleType("cuda.bindings.runtime")
    fail = fail or {}
    host: dict[int, ctypes.Array] = {}
    graphs: dict[int, list] = {}
    execs: dict[int, list] = {}

    no_result = {
        "cudaFree",
        "cudaFreeHost",
        "cudaStreamDestroy",
        "cudaMemcpyAsync",
        "cudaStreamSynchronize",
        "cudaEventRecord",
        "cudaEventDestroy",
        "cudaStreamBeginCapture",
        "cudaGraphDestroy",
        "cudaGraphExecDestroy",
        "cudaGraphLaunch",
        "cudaGetLastError",
    }  # these return (err,) alone

    def call(fn):
        def wrapped(*args):
            if fn.__name__ in fail:  # on error the result slot is None
                device.last_error = fail[fn.__name__]
                return (fail[fn.__name__],) if fn.__name__ in no_result else (fail[fn.__name__], None)
            out = fn(*args)
            if isinstance(out, tuple) and out and out[0] == "error":  # ("error", code): failed with that code
                return (out[1],) if fn.__name__ in no_result else (out[1], None)
            return (0,) if fn.__name__ in no_result else (0, out)

        setattr(rt, fn.__name__, wrapped)
        return wrapped

    @call
    def cudaGetDeviceCount():
        return 1

    @call
    def cudaDriverGetVersion():
        return driver_version  # needs no usable driver: 0 when none is installed (CUDA Runtime API)

    @call
    def cudaGetLastError():
        err, device.last_error = device.last_error, 0
        return ("error", err) if err else None

    @call
    def cudaGetErrorString(err):
        return {
            2: b"out of memory",
            35: b"CUDA driver version is insufficient for CUDA runtime version",
            901: b"operation failed due to a previous error during capture",
        }.get(int(err), b"unknown error")

    @call
    def cudaGetDeviceProperties(index):
        return types.SimpleNamespace(
            name=DEVICE.name.encode() + b"\0" * 200,
            major=DEVICE.compute_capability[0],
            minor=DEVICE.compute_capability[1],
            totalGlobalMem=DEVICE.total_memory,
        )

    @call
    def cudaMalloc(nbytes):
        return device.alloc(nbytes)

    @call
    def cudaFree(ptr):
        device.free(ptr)

    @call
    def cudaMallocHost(nbytes):
        buf = ctypes.create_string_buffer(max(int(nbytes), 1))
        host[ctypes.addressof(buf)] = buf
        return ctypes.addressof(buf)

    @call
    def cudaFreeHost(ptr):
        del host[int(ptr)]

    @call
    def cudaStreamCreateWithFlags(flags):
        assert flags == rt.cudaStreamNonBlocking
        return _Handle(device.new_stream())

    @call
    def cudaStreamDestroy(stream):
        device.destroy_stream(_raw(stream))

    @call
    def cudaMemcpyAsync(dst, src, count, kind, stream):
        assert kind in (rt.cudaMemcpyKind.cudaMemcpyHostToDevice, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost)
        device.enqueue(_raw(stream), lambda: device.copy(int(dst), int(src), int(count)))

    @call
    def cudaStreamSynchronize(stream):
        device.synchronize(_raw(stream))

    @call
    def cudaEventCreate():
        return device.new_event()

    @call
    def cudaEventDestroy(event):
        device.destroy_event(event)

    @call
    def cudaEventRecord(event, stream):
        device.record(event, _raw(stream))

    @call
    def cudaEventElapsedTime(start, end):
        return end[0] - start[0]

    @call
    def cudaStreamBeginCapture(stream, mode):
        assert mode == rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        device.begin_capture(_raw(stream))

    @call
    def cudaStreamEndCapture(stream):
        graph = device.end_capture(_raw(stream))
        if graph is None:  # an invalidated capture: error 901 and no graph (trtexec's sampleDevice.h)
            return ("error", 901)
        graphs[id(graph)] = graph
        return _Handle(id(graph))

    @call
    def cudaGraphInstantiate(graph, flags):
        exec_graph = device.instantiate(graphs[_raw(graph)])
        execs[id(exec_graph)] = exec_graph
        return _Handle(id(exec_graph))

    @call
    def cudaGraphDestroy(graph):
        device.destroy_captured(graphs.pop(_raw(graph)))

    @call
    def cudaGraphExecDestroy(graph_exec):
        device.destroy_graph(execs.pop(_raw(graph_exec)))

    @call
    def cudaGraphLaunch(graph_exec, stream):
        device.launch(execs[_raw(graph_exec)], _raw(stream))

    rt.cudaStreamNonBlocking = 1
    rt.cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)
    rt.cudaStreamCaptureMode = types.SimpleNamespace(cudaStreamCaptureModeThreadLocal=1)
    rt.host = host
    rt.get_cuda_native_handle = get_cuda_native_handle
    return rt


class _DataType:
    """A tensorrt.DataType member: ``itemsize`` in bytes (0.5 for the 4-bit types; bindings' __init__.py)."""

    def __init__(self, name: str, itemsize: float, np_name: str | None):
        self.name, self.itemsize, self.np_name = name, itemsize, np_name

    def __repr__(self) -> str:
        return f"DataType.{self.name}"


DATA_TYPES = {
    "float32": _DataType("FLOAT", 4, "float32"),
    "float16": _DataType("HALF", 2, "float16"),
    "bfloat16": _DataType("BF16", 2, None),
    "fp8": _DataType("FP8", 1, None),
    "int8": _DataType("INT8", 1, "int8"),
    "int32": _DataType("INT32", 4, "int32"),
}


def nptype(dt: _DataType):
    """tensorrt.nptype: numpy types for float32/16, int8/32/64, bool and uint8; a bare TypeError
    for BF16, FP8, INT4 and FP4, which numpy has no type for (bindings' tensorrt/__init__.py)."""
    if dt.np_name is None:
        raise TypeError(f"Could not resolve TensorRT datatype to an equivalent numpy datatype: {dt!r}")
    return np.dtype(dt.np_name).type


class _Context:
    def __init__(self, engine: _Engine):
        self.engine, self.shape, self.addr, self.profile = engine, None, {}, None
        self.ran: set[tuple] = set()
        # ExecutionContextAllocationStrategy.STATIC (the default of create_execution_context,
        # NvInfer.h): each context allocates the engine's activation memory for itself
        dev = engine.device
        self.memory = dev.alloc(engine.device_memory_size_v2) if dev is not None else None

    def __del__(self):
        if self.memory is not None and self.memory in self.engine.device.buffers:
            self.engine.device.free(self.memory)

    def set_optimization_profile_async(self, index: int, stream_handle: int) -> bool:
        # the binding raises on failure rather than returning False (pyCore.cpp wraps it in a
        # lambda that throws; pyCoreDoc.h set_optimization_profile_async)
        if self.engine.options.get("profile_error") or index >= self.engine.num_optimization_profiles:
            raise RuntimeError("Error Code 1: Cask (setOptimizationProfile failed)")
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
        if name == self.engine.output:
            return (n, self.engine.classes, h, w)
        if name in self.engine.extra_outputs:
            return (n, 1, h, w)
        return self.shape

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.addr[name] = ptr
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        e, dev = self.engine, self.engine.device
        # enqueueV3 fails unless every input and output tensor has an address (NvInfer.h
        # IExecutionContext::enqueueV3: "all input and output tensor addresses must be set")
        if self.profile is None or self.infer_shapes() or set(self.addr) != set(e.names):
            return False
        if dev.capturing(stream_handle) and self.shape not in self.ran:
            return False  # the first run of a shape initialises lazily, which capture forbids
        shape, d_in, d_out = self.shape, int(self.addr[e.input]), int(self.addr[e.output])
        io = np.dtype(e.io_dtype.np_name)
        extra = [(int(self.addr[n]), (shape[0], 1, *shape[2:])) for n in e.extra_outputs]

        def op():
            dev.engine_runs += 1
            x = np.frombuffer(ctypes.string_at(d_in, int(np.prod(shape)) * io.itemsize), io).reshape(shape)
            y = np.ascontiguousarray(e.session.run(None, {e.input: x.astype(np.float32)})[0], io)
            dev.copy(d_out, y.ctypes.data, y.nbytes)
            for ptr, s in extra:
                z = np.ones(s, io)
                dev.copy(ptr, z.ctypes.data, z.nbytes)

        if dev.capturing(stream_handle) and not e.options.get("capturable", True):
            # an engine that cannot be captured (data-dependent shapes, some plugins) fails part-way:
            # some of its work was recorded, then enqueueV3 reports failure; trtexec's sampleDevice.h
            # endCaptureOnError covers both outcomes, an invalidated capture or a graph not to be used
            dev.enqueue(stream_handle, lambda: None)
            if e.options.get("capture_failure") == "invalidate":
                dev.invalidate_capture(stream_handle)
            return False
        dev.enqueue(stream_handle, op)
        self.ran.add(shape)
        return True


def fake_pycuda_driver(device: Device) -> types.ModuleType:
    """``pycuda.driver`` as the project calls it, over the fake device (no graph capture)."""
    drv = types.ModuleType("pycuda.driver")
    contexts: list = []
    host: dict[int, object] = {}

    class Error(Exception):
        pass

    class Context:
        def pop(self) -> None:
            contexts.remove(self)

    class Device_:
        def __init__(self, index: int):
            self.index = index

        @staticmethod
        def count() -> int:
            return 1

        def make_context(self) -> Context:
            contexts.append(Context())
            return contexts[-1]

        def name(self) -> str:
            return DEVICE.name

        def compute_capability(self) -> tuple[int, int]:
            return DEVICE.compute_capability

        def total_memory(self) -> int:
            return DEVICE.total_memory

    class DeviceAllocation:
        def __init__(self, nbytes: int):
            self.ptr = device.alloc(nbytes)

        def __int__(self) -> int:
            return self.ptr

        def free(self) -> None:
            device.free(self.ptr)

    class Stream:
        def __init__(self):
            self.handle = device.new_stream()

        def synchronize(self) -> None:
            device.synchronize(self.handle)

        def __del__(self):  # pycuda destroys a stream when it is garbage-collected
            device.destroy_stream(self.handle)

    class Event:
        def __init__(self):
            self.at = [0.0]

        def record(self, stream: Stream) -> None:
            device.record(self.at, stream.handle)

        def synchronize(self) -> None:
            pass

        def time_since(self, start: Event) -> float:
            return self.at[0] - start.at[0]

    class HostAllocation:
        """pycuda's page-locked allocation: the ``.base`` of a pagelocked_empty array; ``free()``
        releases it at once instead of at garbage collection (doc/driver.rst, HostAllocation)."""

        def __init__(self, nbytes: int):
            self.buf = ctypes.create_string_buffer(max(int(nbytes), 1))
            host[id(self)] = self

        def free(self) -> None:
            del host[id(self)]

    def pagelocked_empty(shape, dtype):
        dtype = np.dtype(dtype)
        alloc = HostAllocation(int(np.prod(shape)) * dtype.itemsize)
        arr = np.frombuffer(memoryview(alloc.buf).cast("B"), dtype, int(np.prod(shape))).reshape(shape)
        return _with_base(arr, alloc)

    def memcpy_htod_async(dest: int, src: np.ndarray, stream: Stream) -> None:
        device.enqueue(stream.handle, lambda: device.copy(int(dest), src.ctypes.data, src.nbytes))

    def memcpy_dtoh_async(dest: np.ndarray, src: int, stream: Stream) -> None:
        device.enqueue(stream.handle, lambda: device.copy(dest.ctypes.data, int(src), dest.nbytes))

    drv.init = lambda: None
    drv.Error, drv.Device, drv.Stream, drv.Event = Error, Device_, Stream, Event
    drv.mem_alloc = DeviceAllocation
    drv.pagelocked_empty, drv.memcpy_htod_async, drv.memcpy_dtoh_async = (
        pagelocked_empty,
        memcpy_htod_async,
        memcpy_dtoh_async,
    )
    drv.contexts, drv.host = contexts, host
    return drv


class _PageLocked(np.ndarray):
    """An ndarray whose ``.base`` is pycuda's HostAllocation, as pagelocked_empty returns it."""

    _alloc = None

    @property
    def base(self):  # numpy's own base here is the memoryview; pycuda's arrays report the allocation
        return self._alloc

    def __array_finalize__(self, obj):
        pass


def _with_base(arr: np.ndarray, alloc) -> np.ndarray:
    out = arr.view(_PageLocked)
    out._alloc = alloc
    return out


PLAN_MAGIC = b"FAKEPLAN\n"


def fake_plan_bytes(onnx_bytes: bytes, profile: tuple[int, int, int], **options) -> bytes:
    """What the fake builder writes: the batch profile and engine options, then the ONNX model.
    Options: ``io_dtype`` ("float32", "float16", "bfloat16": the engine's I/O tensors),
    ``extra_outputs`` (names of further (n, 1, H, W) outputs), ``capturable`` (False: enqueue
    fails inside graph capture), ``capture_failure`` ("invalidate": and invalidates the capture),
    ``profile_error`` (selecting the profile raises)."""
    head = {"profile": list(profile), **options}
    return PLAN_MAGIC + json.dumps(head).encode() + b"\n" + onnx_bytes


class _Engine:
    def __init__(self, plan: bytes, device: Device | None):
        import onnxruntime as ort

        head, onnx_bytes = plan[len(PLAN_MAGIC) :].split(b"\n", 1)
        self.options = json.loads(head)
        self.session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
        i, o = self.session.get_inputs()[0], self.session.get_outputs()[0]
        self.input, self.output = i.name, o.name
        self.extra_outputs = list(self.options.get("extra_outputs", []))
        self.names = [self.input, self.output, *self.extra_outputs]
        self.chw = tuple(i.shape[1:])
        self.classes = o.shape[1]
        self.profile, self.device = tuple(self.options["profile"]), device
        self.io_dtype = DATA_TYPES[self.options.get("io_dtype", "float32")]
        self.num_io_tensors = len(self.names)
        self.num_optimization_profiles = 1
        self.device_memory_size_v2 = 3 << 20

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str) -> str:
        return "input" if name == self.input else "output"

    def get_tensor_dtype(self, name: str) -> _DataType:
        return self.io_dtype

    def get_tensor_shape(self, name: str) -> tuple:
        """Engine-level shapes: -1 where the profile decides (the batch)."""
        h, w = self.chw[1:]
        return (-1, self.chw[0] if name == self.input else self.classes if name == self.output else 1, h, w)

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
    """A timing cache: tied to the TensorRT version and GPU that made it (the developer guide's
    "Timing Cache": caches are not portable across devices or versions), ``+`` per build."""

    def __init__(self, data: bytes, owner: bytes):
        self.data = data or owner + b"\n"

    def serialize(self) -> bytes:
        return self.data


class _Config:
    def __init__(self, trt, owner: bytes):
        self.trt, self.owner = trt, owner
        self.profiles, self.pools, self.cache = [], {}, None
        # TF32 is on by default (NvInfer.h BuilderFlag::kTF32: "Enabled by default")
        self.flags = {trt.BuilderFlag.TF32}
        self.builder_optimization_level = 3

    def set_flag(self, flag) -> None:
        self.flags.add(flag)

    def clear_flag(self, flag) -> None:
        self.flags.discard(flag)

    def get_flag(self, flag) -> bool:
        return flag in self.flags

    def set_memory_pool_limit(self, pool, size: int) -> None:
        self.pools[pool] = size

    def add_optimization_profile(self, profile: _Profile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, data: bytes) -> _TimingCache:
        return _TimingCache(bytes(data), self.owner)

    def set_timing_cache(self, cache: _TimingCache, ignore_mismatch: bool) -> bool:
        """False for a cache of another device or version unless ``ignore_mismatch`` (NvInfer.h
        IBuilderConfig::setTimingCache "returns true if set successfully"); nothing is attached then."""
        if not ignore_mismatch and not cache.data.startswith(self.owner + b"\n"):
            return False
        self.cache = cache
        return True

    def get_timing_cache(self) -> _TimingCache | None:
        return self.cache  # None when no cache is attached (pyCoreDoc.h get_timing_cache)


def fake_tensorrt(device: Device | None = None, version: str = VERSION) -> types.ModuleType:
    """A module with the tensorrt names the project uses, as ``version`` has them (11.x has no
    EXPLICIT_BATCH flag and no precision builder flags). Builds records what they were given
    in ``trt.builds``; plans are ``fake_plan_bytes``. ``trt.live_builders`` counts Builder
    objects not yet freed; ``trt.deserialized_with_builders`` records that count at each
    deserialization."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.builds, trt.deserialized_with_builders = [], []
    trt.live_builders = 0
    v11 = int(version.split(".")[0]) >= 11
    owner = f"{version}/{DEVICE.name}".encode()

    class Logger:
        WARNING, VERBOSE = 2, 4

        def __init__(self, level=WARNING):
            self.level = level

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, plan: bytes):
            trt.deserialized_with_builders.append(trt.live_builders)
            return _Engine(bytes(plan), device) if bytes(plan).startswith(PLAN_MAGIC) else None

    class Builder:
        def __init__(self, logger):
            self.logger = logger
            trt.live_builders += 1

        def __del__(self):
            trt.live_builders -= 1

        def create_network(self, flags: int = 0) -> _Network:
            return _Network(flags)

        def create_builder_config(self) -> _Config:
            return _Config(trt, owner)

        def create_optimization_profile(self) -> _Profile:
            return _Profile()

        def build_serialized_network(self, network: _Network, config: _Config):
            import onnx

            trt.builds.append({"network": network, "config": config, "flags": set(config.flags)})
            name = network.input.name
            dims = [d.dim_value or None for d in network.input.type.tensor_type.shape.dim]
            if len(config.profiles) != 1 or name not in config.profiles[0].shapes:
                return None
            lo, opt, hi = config.profiles[0].shapes[name]
            if any(d is not None and d != x for shape in (lo, opt, hi) for d, x in zip(dims[1:], shape[1:])):
                return None  # a profile that contradicts the model's static dimensions
            if config.cache is not None:
                config.cache = _TimingCache(config.cache.data + b"+", owner)
            onnx.load_from_string(network.onnx)
            return fake_plan_bytes(network.onnx, (lo[0], opt[0], hi[0]))

    # NetworkDefinitionCreationFlag: 10.x kEXPLICIT_BATCH = 0, kSTRONGLY_TYPED = 1; 11.x removed
    # kEXPLICIT_BATCH, so kSTRONGLY_TYPED = 0 and 1, 2 are kPREFER_AOT/JIT_PYTHON_PLUGINS (NvInfer.h)
    if v11:
        flags = {"STRONGLY_TYPED": 0, "PREFER_AOT_PYTHON_PLUGINS": 1, "PREFER_JIT_PYTHON_PLUGINS": 2}
    else:
        flags = {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1}
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(**flags)
    trt.BuilderFlag = types.SimpleNamespace(TF32=1) if v11 else types.SimpleNamespace(TF32=1, FP16=2, INT8=3)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE=0)
    trt.Logger, trt.Runtime, trt.Builder, trt.OnnxParser = Logger, Runtime, Builder, _Parser
    trt.TensorIOMode = types.SimpleNamespace(INPUT="input", OUTPUT="output")
    trt.DataType = types.SimpleNamespace(**{d.name: d for d in DATA_TYPES.values()})
    trt.float32, trt.float16, trt.bfloat16 = DATA_TYPES["float32"], DATA_TYPES["float16"], DATA_TYPES["bfloat16"]
    trt.nptype = nptype
    return trt
