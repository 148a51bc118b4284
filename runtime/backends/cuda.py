"""A tiny CUDA interface: device memory, pinned host buffers, streams, events, CUDA graphs.

Implemented with NVIDIA's cuda-python (preferred; prebuilt wheels) and with pycuda (common
on Jetson); whichever is installed, cuda-python first. Every cuda-python call returns a
tuple whose first element is a cudaError_t (0 = success); ``_ok`` turns failures into one
SegError naming the call.
"""

from __future__ import annotations

import ctypes

import numpy as np

from ..errors import MissingDependency, SegError
from .plan import DeviceInfo, parse_version

NO_GPU = {35: "no NVIDIA driver could be loaded", 100: "no CUDA-capable GPU was found"}
INSUFFICIENT_DRIVER = 35  # cudaErrorInsufficientDriver: no driver at all, or one older than the runtime needs
CAPTURE_INVALIDATED = 901  # cudaErrorStreamCaptureInvalidated (driver_types.h)


class CudaError(SegError):
    pass


def _import_cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python 12.x (recent) and 13.x
    except ImportError:
        from cuda import cudart  # older 12.x layout (removed in 13.0)
    return cudart


def _native_handle_getter():
    """cuda.bindings.utils.get_cuda_native_handle (cuda-bindings 12.9.1+: ``int(handle)`` is
    deprecated there), or None on older bindings, where ``int()`` is the way."""
    try:
        from cuda.bindings.utils import get_cuda_native_handle
    except ImportError:
        return None
    return get_cuda_native_handle


def _distribution_version(*names: str) -> tuple[str, str] | None:
    """(name, version) of the first installed distribution among ``names``."""
    from importlib import metadata

    for name in names:
        try:
            return name, metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def binding_major() -> int | None:
    """The CUDA major version of the installed cuda-bindings (or cuda-python) wheel."""
    found = _distribution_version("cuda-bindings", "cuda-python")
    return parse_version(found[1])[0] if found else None


def tensorrt_cuda_major() -> int | None:
    """The CUDA major version TensorRT's pip wheel was built for (tensorrt-cu12 / -cu13), or None
    when TensorRT is not a pip wheel (JetPack's system package)."""
    for major in (13, 12, 11):
        if _distribution_version(f"tensorrt-cu{major}", f"tensorrt-cu{major}-bindings", f"tensorrt-cu{major}-libs"):
            return major
    return None


def binding_mismatch() -> str | None:
    """A sentence naming a CUDA-major mismatch between TensorRT's wheel and the CUDA binding, or None."""
    trt_major, bind_major = tensorrt_cuda_major(), binding_major()
    if trt_major is None or bind_major is None or trt_major == bind_major:
        return None
    return (
        f"TensorRT is the CUDA {trt_major} wheel (tensorrt-cu{trt_major}) but the CUDA binding is for CUDA "
        f'{bind_major}; install the matching one: pip install "unet-edge[trt-cu{trt_major}]"'
    )


class CudaPython:
    name = "cuda-python"
    can_capture = True

    def __init__(self) -> None:
        self.rt = _import_cudart()
        self._native = _native_handle_getter()
        err, count = self.rt.cudaGetDeviceCount()
        if int(err) != 0 or not count:
            raise CudaError(f"cannot use the GPU: {self._why_no_gpu(err)} (cudaGetDeviceCount returned {int(err)})")
        self._host: dict[int, int] = {}

    def _why_no_gpu(self, err) -> str:
        """Error 35 means no driver, or a driver older than this binding's CUDA (cuda-bindings 13
        needs r580+, so r535-r570 drivers give 35 too); the driver's own version tells which."""
        if int(err) != INSUFFICIENT_DRIVER:
            return NO_GPU.get(int(err), self._msg(err))
        e, driver = self.rt.cudaDriverGetVersion()  # works without a usable driver: 0 when none loads
        major = binding_major()
        if int(e) == 0 and driver and major and driver // 1000 < major:
            return (
                f"the NVIDIA driver (CUDA {driver // 1000}.{driver % 1000 // 10}) is too old for cuda-bindings "
                f"{major} (CUDA {major} needs a newer driver{', r580 or later' if major == 13 else ''}); "
                f'install the CUDA {driver // 1000} binding: pip install "unet-edge[trt-cu{driver // 1000}]"'
            )
        mismatch = binding_mismatch()
        return NO_GPU[INSUFFICIENT_DRIVER] + (f"; also, {mismatch}" if mismatch else "")

    def _msg(self, err) -> str:
        e, s = self.rt.cudaGetErrorString(err)
        return s.decode() if isinstance(s, bytes) else str(s)

    def _ok(self, result, call: str):
        err, rest = result[0], result[1:]
        if int(err) != 0:
            raise CudaError(f"{call} failed: {self._msg(err)} ({int(err)})")
        return rest[0] if len(rest) == 1 else rest

    def device_info(self, index: int = 0) -> DeviceInfo:
        p = self._ok(self.rt.cudaGetDeviceProperties(index), "cudaGetDeviceProperties")
        name = p.name.split(b"\0", 1)[0].decode() if isinstance(p.name, bytes) else str(p.name)
        return DeviceInfo(name, (int(p.major), int(p.minor)), int(p.totalGlobalMem))

    def malloc(self, nbytes: int) -> int:
        return int(self._ok(self.rt.cudaMalloc(nbytes), "cudaMalloc"))

    def free(self, ptr: int) -> None:
        self._ok(self.rt.cudaFree(ptr), "cudaFree")

    def host_empty(self, shape, dtype) -> np.ndarray:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        ptr = int(self._ok(self.rt.cudaMallocHost(nbytes), "cudaMallocHost"))
        arr = np.frombuffer((ctypes.c_byte * nbytes).from_address(ptr), dtype=dtype).reshape(shape)
        self._host[id(arr)] = ptr
        return arr

    def host_free(self, arr: np.ndarray) -> None:
        self._ok(self.rt.cudaFreeHost(self._host.pop(id(arr))), "cudaFreeHost")

    def stream(self):
        return self._ok(self.rt.cudaStreamCreateWithFlags(self.rt.cudaStreamNonBlocking), "cudaStreamCreateWithFlags")

    def stream_handle(self, stream) -> int:
        return int(self._native(stream)) if self._native else int(stream)

    def destroy_stream(self, stream) -> None:
        self._ok(self.rt.cudaStreamDestroy(stream), "cudaStreamDestroy")

    def htod_async(self, dst: int, src: np.ndarray, stream) -> None:
        self._ok(
            self.rt.cudaMemcpyAsync(
                dst, src.ctypes.data, src.nbytes, self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream
            ),
            "cudaMemcpyAsync(H2D)",
        )

    def dtoh_async(self, dst: np.ndarray, src: int, stream) -> None:
        self._ok(
            self.rt.cudaMemcpyAsync(
                dst.ctypes.data, src, dst.nbytes, self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream
            ),
            "cudaMemcpyAsync(D2H)",
        )

    def synchronize(self, stream) -> None:
        self._ok(self.rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

    def event(self):
        return self._ok(self.rt.cudaEventCreate(), "cudaEventCreate")

    def record(self, event, stream) -> None:
        self._ok(self.rt.cudaEventRecord(event, stream), "cudaEventRecord")

    def destroy_event(self, event) -> None:
        self._ok(self.rt.cudaEventDestroy(event), "cudaEventDestroy")

    def elapsed_ms(self, start, end) -> float:
        return float(self._ok(self.rt.cudaEventElapsedTime(start, end), "cudaEventElapsedTime"))

    def begin_capture(self, stream) -> None:
        self._ok(
            self.rt.cudaStreamBeginCapture(stream, self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal),
            "cudaStreamBeginCapture",
        )

    def end_capture(self, stream):
        graph = self._ok(self.rt.cudaStreamEndCapture(stream), "cudaStreamEndCapture")
        instantiated = self.rt.cudaGraphInstantiate(graph, 0)
        self._ok(self.rt.cudaGraphDestroy(graph), "cudaGraphDestroy")  # the executable graph does not need it
        return self._ok(instantiated, "cudaGraphInstantiate")

    def end_capture_on_error(self, stream) -> None:
        """End a capture whose enqueue failed, as trtexec does (sampleDevice.h endCaptureOnError):
        an invalidated capture returns no graph; otherwise the graph exists but must not be used,
        so it is destroyed, never instantiated; then the sticky error is cleared."""
        err, graph = self.rt.cudaStreamEndCapture(stream)
        if int(err) == 0 and graph is not None:
            self._ok(self.rt.cudaGraphDestroy(graph), "cudaGraphDestroy")
        elif int(err) != CAPTURE_INVALIDATED:
            self.rt.cudaGetLastError()
            raise CudaError(f"cudaStreamEndCapture failed: {self._msg(err)} ({int(err)})")
        self.rt.cudaGetLastError()

    def launch(self, graph_exec, stream) -> None:
        self._ok(self.rt.cudaGraphLaunch(graph_exec, stream), "cudaGraphLaunch")

    def destroy_graph(self, graph_exec) -> None:
        self._ok(self.rt.cudaGraphExecDestroy(graph_exec), "cudaGraphExecDestroy")

    def close(self) -> None:
        pass


class PyCuda:
    """The same interface over pycuda (a context is made current in this thread)."""

    name = "pycuda"
    can_capture = False

    def __init__(self) -> None:
        import pycuda.driver as drv

        self.drv = drv
        try:
            drv.init()
            if drv.Device.count() == 0:
                raise CudaError("cannot use the GPU: no CUDA-capable GPU was found")
            self.ctx = drv.Device(0).make_context()
        except drv.Error as exc:
            raise CudaError(f"cannot use the GPU: {exc}") from exc
        self._alloc: dict[int, object] = {}

    def device_info(self, index: int = 0) -> DeviceInfo:
        d = self.drv.Device(index)
        return DeviceInfo(d.name(), tuple(d.compute_capability()), int(d.total_memory()))

    def malloc(self, nbytes: int) -> int:
        a = self.drv.mem_alloc(nbytes)
        self._alloc[int(a)] = a
        return int(a)

    def free(self, ptr: int) -> None:
        self._alloc.pop(ptr).free()

    def host_empty(self, shape, dtype) -> np.ndarray:
        return self.drv.pagelocked_empty(shape, dtype)

    def host_free(self, arr: np.ndarray) -> None:
        arr.base.free() if hasattr(arr.base, "free") else None

    def stream(self):
        return self.drv.Stream()

    def stream_handle(self, stream) -> int:
        return int(stream.handle)

    def destroy_stream(self, stream) -> None:
        pass

    def htod_async(self, dst: int, src: np.ndarray, stream) -> None:
        self.drv.memcpy_htod_async(dst, src, stream)

    def dtoh_async(self, dst: np.ndarray, src: int, stream) -> None:
        self.drv.memcpy_dtoh_async(dst, src, stream)

    def synchronize(self, stream) -> None:
        stream.synchronize()

    def event(self):
        return self.drv.Event()

    def record(self, event, stream) -> None:
        event.record(stream)

    def destroy_event(self, event) -> None:
        pass  # pycuda frees an event when it is garbage-collected

    def elapsed_ms(self, start, end) -> float:
        end.synchronize()
        return float(end.time_since(start))

    def begin_capture(self, stream) -> None:
        raise CudaError("CUDA graph capture is not available through pycuda here")

    def end_capture(self, stream):
        raise CudaError("CUDA graph capture is not available through pycuda here")

    def end_capture_on_error(self, stream) -> None:
        raise CudaError("CUDA graph capture is not available through pycuda here")

    def launch(self, graph_exec, stream) -> None:
        raise CudaError("CUDA graph capture is not available through pycuda here")

    def destroy_graph(self, graph_exec) -> None:
        pass  # capture never succeeds here, so there is no graph to destroy

    def close(self) -> None:
        self.ctx.pop()


def load_cuda():
    """cuda-python if installed, else pycuda; one clear line if neither or no GPU."""
    try:
        _import_cudart()
    except ImportError:
        pass
    else:
        return CudaPython()
    try:
        import pycuda.driver  # noqa: F401
    except ImportError:
        raise MissingDependency(
            "the TensorRT backend needs a CUDA binding for TensorRT's CUDA: pip install 'unet-edge[trt-cu12]' "
            "(or [trt-cu13] beside tensorrt-cu13), or pycuda"
        ) from None
    return PyCuda()


def device_info(index: int = 0) -> DeviceInfo:
    cuda = load_cuda()
    try:
        return cuda.device_info(index)
    finally:
        cuda.close()
