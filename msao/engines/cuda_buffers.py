"""Device memory, streams and copies for the TensorRT runner, through cuda-python's runtime API.

Owns allocation and freeing; knows nothing of TensorRT or segments. ``cuda`` is imported on
first use, so importing this module costs nothing on a machine without CUDA. The runtime API
works in the device's primary context, the one the driver-API MAS kernel (``mas_cuda``) also
retains, so a pointer allocated here is valid in that kernel: that is how the kernel reads
the vision engine's output in place (``DeviceTensor``).

Untested on hardware here (no GPU on the build machine); tests/engines/test_tensorrt_gpu.py
exercises it where a GPU and TensorRT exist.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from msao.errors import GpuUnavailable, MissingDependency

__all__ = ["CudaStream", "DeviceBuffers", "device_properties", "DeviceTensor"]

log = logging.getLogger(__name__)

_MIN_BYTES = 256  # never bind a null or zero-byte address, even for an empty tensor (past length 0)


def cuda_bindings(module: str, legacy: str, needed_for: str):
    """One of cuda-python's binding modules (``runtime``, ``driver``, ``nvrtc``), imported on first use.

    cuda-python >= 12.6 names them ``cuda.bindings.<module>``; older releases (JetPack 6.0's)
    ``cuda.<legacy>``.

    Raises:
        MissingDependency: neither imports; the message says what needed it and what to install.
    """
    import importlib

    try:
        return importlib.import_module(f"cuda.bindings.{module}")
    except ImportError:
        try:
            return importlib.import_module(f"cuda.{legacy}")
        except ImportError as exc:
            raise MissingDependency(f"{needed_for} needs cuda-python: pip install 'msao[gpu]'") from exc


def _cudart():
    return cuda_bindings("runtime", "cudart", "device memory for TensorRT segments")


def cuda_result(result, what: str, hint: str = "TensorRT segments need an NVIDIA GPU and driver"):
    """Unpack a cuda-python ``(err, *values)`` tuple (runtime, driver and NVRTC calls alike).

    Raises:
        GpuUnavailable: ``err`` is not success; the message names the call, the error and ``hint``.
    """
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise GpuUnavailable(f"{what} failed with {getattr(err, 'name', err)}; {hint}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


_ok = cuda_result


@dataclass(frozen=True)
class DeviceTensor:
    """A dense, C-ordered tensor in device memory, lent to a callback: the borrower never frees it
    and must not keep the pointer past the callback (the runner reuses the buffer next call).

    Attributes:
        name: the tensor's name in the segment.
        ptr: device address (an int).
        shape: dims, e.g. (B, N, Dv).
        dtype: numpy dtype name ("float32").
        stream: the CUDA stream the producer ran on (an int handle); work that reads the
            tensor should be ordered after it (the runner synchronises before lending).
    """

    name: str
    ptr: int
    shape: tuple[int, ...]
    dtype: str
    stream: int = 0

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    def item(self, index: int) -> DeviceTensor:
        """Element ``index`` along the first axis (one image of a batch): (B, ...) -> (...)."""
        if not self.shape or not 0 <= index < self.shape[0]:
            raise IndexError(f"{self.name}: index {index} outside the first axis of shape {self.shape}")
        step = self.nbytes // self.shape[0]
        return DeviceTensor(self.name, self.ptr + index * step, self.shape[1:], self.dtype, self.stream)


def device_properties(device: int = 0) -> tuple[str, str]:
    """(GPU name, compute capability "major.minor") of CUDA device ``device``.

    Raises:
        MissingDependency: no cuda-python. GpuUnavailable: no driver or no such device.
    """
    cudart = _cudart()
    try:
        prop = _ok(cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    except (RuntimeError, OSError) as exc:  # cuda.pathfinder: no libcudart / libcuda
        raise GpuUnavailable(f"no CUDA runtime: {type(exc).__name__}: {exc}") from exc
    raw = prop.name
    name = (raw.split(b"\0", 1)[0].decode(errors="replace") if isinstance(raw, bytes) else str(raw)).strip()
    return name, f"{prop.major}.{prop.minor}"


class CudaStream:
    """One CUDA stream (blocking w.r.t. the legacy default stream). ``close`` destroys it."""

    def __init__(self, device: int = 0):
        self._rt = _cudart()
        _ok(self._rt.cudaSetDevice(device), "cudaSetDevice")
        self._stream = _ok(self._rt.cudaStreamCreate(), "cudaStreamCreate")

    @property
    def handle(self) -> int:
        return int(self._stream)

    def synchronize(self) -> None:
        _ok(self._rt.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")

    def close(self) -> None:
        if self._stream is not None:
            self._rt.cudaStreamDestroy(self._stream)
            self._stream = None


class DeviceBuffers:
    """Named device allocations that grow on demand and are reused across calls.

    A buffer is reallocated only when a call needs more bytes than it holds (and then to twice
    the need, so a growing KV cache reallocates O(log n) times). Freed by ``close``; the
    runner that owns this object calls it.
    """

    def __init__(self) -> None:
        self._rt = _cudart()
        self._bufs: dict[object, tuple[int, int]] = {}

    def ensure(self, key: object, nbytes: int) -> int:
        """A device address with room for ``nbytes`` under ``key`` (contents undefined after growth)."""
        ptr, capacity = self._bufs.get(key, (0, 0))
        if nbytes > capacity or not ptr:
            if ptr:
                _ok(self._rt.cudaFree(ptr), "cudaFree")
            capacity = max(_MIN_BYTES, 2 * nbytes)
            ptr = int(_ok(self._rt.cudaMalloc(capacity), f"cudaMalloc({capacity} B)"))
            self._bufs[key] = (ptr, capacity)
        return ptr

    def upload(self, key: object, array: np.ndarray, stream: CudaStream) -> int:
        """Copy a C-contiguous host array into buffer ``key``; returns its device address."""
        ptr = self.ensure(key, array.nbytes)
        if array.nbytes:
            kind = self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice
            _ok(self._rt.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes, kind, stream.handle), "cudaMemcpyAsync(H2D)")
        return ptr

    def download(self, ptr: int, out: np.ndarray, stream: CudaStream) -> None:
        """Copy ``out.nbytes`` from ``ptr`` into the C-contiguous host array ``out`` (complete after a stream sync)."""
        if out.nbytes:
            kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
            _ok(self._rt.cudaMemcpyAsync(out.ctypes.data, ptr, out.nbytes, kind, stream.handle), "cudaMemcpyAsync(D2H)")

    def copy_rows(self, dst: int, dst_pitch: int, src: int, src_pitch: int, row_bytes: int, rows: int, stream: CudaStream) -> None:
        """Device-to-device copy of ``rows`` rows of ``row_bytes`` between pitched layouts (a KV slot range)."""
        if row_bytes and rows:
            kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
            _ok(self._rt.cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, row_bytes, rows, kind, stream.handle), "cudaMemcpy2DAsync(D2D)")

    def close(self) -> None:
        for ptr, _ in self._bufs.values():
            self._rt.cudaFree(ptr)
        self._bufs.clear()
