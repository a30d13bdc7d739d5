"""The fused MAS kernel (``mas.cu``) on a CUDA GPU through NVIDIA's ``cuda-python`` bindings.

Owns loading the kernel (a prebuilt cubin/fatbin from ``nvcc``, or NVRTC at first use for the
device's own architecture), device buffers and the launch. Returns the same ``MasScores`` the
NumPy reference returns, so ``mas_from_scores`` (shared host code) turns either into a keep-set.
Imports ``cuda`` lazily: the package works, and tests skip with a reason, without a GPU.

With TensorRT, ``scores_from_device`` reads the vision engine's output buffers in place (the
runner lends their device pointers; see ``TrtRunner.infer_with_device_outputs``): both live in
the device's primary context, which this module retains and the CUDA runtime uses.

Why cuda-python and not pycuda: cuda-python installs from wheels on x86 and aarch64 (Jetson)
and fails only at the first driver call; pycuda needs a source build against the CUDA toolkit
on the Jetson and does not build here (see FIELD_NOTES.md).
"""

from __future__ import annotations

import ctypes
import logging
import time
from pathlib import Path

import numpy as np

from msao.engines.cuda_buffers import DeviceTensor, cuda_bindings, cuda_result
from msao.engines.mas import MasScores, chance_relevance, check_mas_inputs
from msao.errors import GpuUnavailable, MasInputError, MissingDependency

__all__ = ["BLOCK_THREADS", "KERNEL_NAME", "KERNEL_SOURCE", "CudaMas", "cuda_mas_unavailable_reason", "device_matrix", "encode_and_score_on_device"]

log = logging.getLogger(__name__)

KERNEL_SOURCE = Path(__file__).with_name("mas.cu")
KERNEL_NAME = b"mas_fused"
BLOCK_THREADS = 256  # 8 warps: one warp per token row at a time


def _driver():
    return cuda_bindings("driver", "cuda", "the MAS GPU kernel")


def _nvrtc():
    return cuda_bindings("nvrtc", "nvrtc", "compiling mas.cu at run time")


def _ok(result, what: str):
    return cuda_result(result, what, "run on a machine with an NVIDIA driver and GPU, or use the NumPy path")


def cuda_mas_unavailable_reason(device: int = 0) -> str | None:
    """None when the kernel can run here, else why not (for logs and ``pytest.skip``)."""
    try:
        driver = _driver()
        _ok(driver.cuInit(0), "cuInit")
        count = _ok(driver.cuDeviceGetCount(), "cuDeviceGetCount")
    except (MissingDependency, GpuUnavailable) as exc:
        return str(exc)
    except (RuntimeError, OSError) as exc:  # cuda.pathfinder raises DynamicLibNotFoundError (a RuntimeError) without libcuda.so
        return f"no CUDA driver: {type(exc).__name__}: {exc}"
    if count <= device:
        return f"CUDA device {device} requested, {count} present"
    return None


def _nvrtc_cubin(source: bytes, arch: str) -> bytes:
    nvrtc = _nvrtc()
    prog = _ok(nvrtc.nvrtcCreateProgram(source, b"mas.cu", 0, [], []), "nvrtcCreateProgram")
    opts = [f"--gpu-architecture={arch}".encode(), b"--std=c++14"]
    err = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)[0]
    if int(err) != 0:
        size = _ok(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
        buf = b" " * size
        nvrtc.nvrtcGetProgramLog(prog, buf)
        raise GpuUnavailable(f"NVRTC could not compile mas.cu for {arch}: {buf.decode(errors='replace')}")
    size = _ok(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
    cubin = b" " * size
    _ok(nvrtc.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
    return cubin


class CudaMas:
    """The fused MAS pass on one CUDA device (batch 1 per call; the kernel takes a batch).

    Not thread-safe. ``close()`` releases the module; device buffers are freed after each call.

    Args:
        device: CUDA device ordinal.
        kernel_image: path of a cubin/fatbin built by ``nvcc`` from ``mas.cu`` (e.g. for sm_87
            and sm_90); None compiles the source with NVRTC for this device.

    Raises:
        MissingDependency: cuda-python is not installed.
        GpuUnavailable: no driver, no device, or the kernel cannot be loaded.
    """

    def __init__(self, device: int = 0, *, kernel_image: Path | None = None):
        reason = cuda_mas_unavailable_reason(device)
        if reason:
            raise GpuUnavailable(f"MAS kernel unavailable: {reason}")
        d = self._d = _driver()
        dev = _ok(d.cuDeviceGet(device), "cuDeviceGet")
        self._dev = dev
        self._ctx = _ok(d.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
        _ok(d.cuCtxSetCurrent(self._ctx), "cuCtxSetCurrent")
        attr = d.CUdevice_attribute
        major = _ok(d.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev), "cuDeviceGetAttribute")
        minor = _ok(d.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev), "cuDeviceGetAttribute")
        self.arch = f"sm_{major}{minor}"
        self.max_shared_bytes = _ok(
            d.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, dev), "cuDeviceGetAttribute"
        )
        image = Path(kernel_image).read_bytes() if kernel_image else _nvrtc_cubin(KERNEL_SOURCE.read_bytes(), self.arch)
        self._image = np.frombuffer(image, np.uint8)  # kept alive while the module loads
        self._module = _ok(d.cuModuleLoadData(self._image.ctypes.data), "cuModuleLoadData")
        self._func = _ok(d.cuModuleGetFunction(self._module, KERNEL_NAME), "cuModuleGetFunction")
        fa = d.CUfunction_attribute
        static = _ok(d.cuFuncGetAttribute(fa.CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, self._func), "cuFuncGetAttribute")
        self.max_dynamic_shared_bytes = int(self.max_shared_bytes) - int(static)  # opt-in limit covers static + dynamic
        _ok(
            d.cuFuncSetAttribute(self._func, fa.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, self.max_dynamic_shared_bytes),
            "cuFuncSetAttribute",
        )
        self.last_kernel_ms = 0.0
        log.info("MAS kernel loaded for %s (%s)", self.arch, "prebuilt image" if kernel_image else "NVRTC")

    def close(self) -> None:
        if getattr(self, "_module", None) is not None:
            self._d.cuModuleUnload(self._module)
            self._module = None
            self._d.cuDevicePrimaryCtxRelease(self._dev)

    def __enter__(self) -> CudaMas:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def scores(
        self,
        mas_features: np.ndarray,
        image_tokens: np.ndarray,
        question_embeddings: np.ndarray,
        previous_tokens: np.ndarray | None = None,
        *,
        content_words: int | None = None,
    ) -> MasScores:
        """Same contract as ``mas.mas_scores_from_tensors``, computed by ``mas_fused`` on the GPU."""
        check_mas_inputs(mas_features, image_tokens, question_embeddings, previous_tokens)
        d = self._d
        bufs = []
        try:
            for a in (np.ascontiguousarray(mas_features, np.float32), np.ascontiguousarray(image_tokens, np.float32)):
                ptr = _ok(d.cuMemAlloc(max(a.nbytes, 8)), "cuMemAlloc")
                bufs.append(ptr)
                _ok(d.cuMemcpyHtoD(ptr, a.ctypes.data, a.nbytes), "cuMemcpyHtoD")
            return self._fused(
                bufs[0], bufs[1], mas_features.shape, image_tokens.shape[1], question_embeddings, previous_tokens, content_words
            )
        finally:
            for ptr in bufs:
                d.cuMemFree(ptr)

    def scores_from_device(
        self,
        mas_features: DeviceTensor,
        image_tokens: DeviceTensor,
        question_embeddings: np.ndarray,
        previous_tokens: np.ndarray | None = None,
        *,
        index: int = 0,
        content_words: int | None = None,
    ) -> MasScores:
        """``scores`` on tensors already on this GPU: the vision engine's outputs, read in place.

        The features and tokens are never copied to the host and back: the kernel reads the
        buffers the TensorRT runner lends (``TrtRunner.infer_with_device_outputs``); only the
        question (and the previous frame's tokens) are uploaded. Batched outputs (B, N, D) are
        read at image ``index``. NaN/Inf cannot be looked for in device inputs without a copy,
        so the scores are checked instead.

        Untested on hardware (no GPU where it was written); tests/engines/test_tensorrt_gpu.py
        compares it with the NumPy reference wherever TensorRT and a GPU exist.

        Raises:
            MasInputError: not float32, wrong rank, shapes that disagree, or non-finite scores.
        """
        f, t = (device_matrix(x, index) for x in (mas_features, image_tokens))
        f_shape_only, t_shape_only = (np.broadcast_to(np.float32(0), x.shape) for x in (f, t))  # no device read
        check_mas_inputs(f_shape_only, t_shape_only, question_embeddings, previous_tokens, values=False)
        d = self._d
        out = self._fused(
            d.CUdeviceptr(f.ptr), d.CUdeviceptr(t.ptr), f.shape, t.shape[1], question_embeddings, previous_tokens, content_words
        )
        if not (np.isfinite(out.saliency).all() and np.isfinite(out.relevance).all()):
            raise MasInputError(
                f"MAS scores from device tensors {mas_features.name}/{image_tokens.name} are not finite: the encoder output is corrupt"
            )
        return out

    def _fused(self, f_ptr, t_ptr, f_shape, dt: int, question_embeddings, previous_tokens, content_words) -> MasScores:
        """Launch ``mas_fused`` on device features ``f_ptr`` (N, Dv) and tokens ``t_ptr`` (N, D), both float32."""
        d = self._d
        n, dv = f_shape
        m = question_embeddings.shape[0]
        shared = 8 * (max(dv, dt) + n + m)
        if shared > self.max_dynamic_shared_bytes:
            raise MasInputError(
                f"MAS kernel needs {shared} B of shared memory for N={n}, Dv={dv}, D={dt}, M={m}; {self.arch} allows "
                f"{self.max_dynamic_shared_bytes} B; use the NumPy path (mas.mas_scores_from_tensors) for inputs this large"
            )
        host_in = [np.ascontiguousarray(question_embeddings, np.float32)]
        if previous_tokens is not None:
            host_in.append(np.ascontiguousarray(previous_tokens, np.float32))
        host_out = [np.zeros(n, np.float64) for _ in range(3)] + [np.zeros(2, np.float64)]
        bufs = []
        try:
            for a in (*host_in, *host_out):
                ptr = _ok(d.cuMemAlloc(max(a.nbytes, 8)), "cuMemAlloc")
                bufs.append(ptr)
            for ptr, a in zip(bufs, host_in):
                _ok(d.cuMemcpyHtoD(ptr, a.ctypes.data, a.nbytes), "cuMemcpyHtoD")
            q_ptr = bufs[0]
            p_ptr = bufs[1] if previous_tokens is not None else d.CUdeviceptr(0)
            s_ptr, r_ptr, c_ptr, red_ptr = bufs[len(host_in) :]
            args = (
                (f_ptr, t_ptr, q_ptr, p_ptr, n, dv, dt, m, s_ptr, r_ptr, c_ptr, red_ptr),
                (None, None, None, None, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, None, None, None, None),
            )
            t0 = time.perf_counter()
            _ok(d.cuLaunchKernel(self._func, 1, 1, 1, BLOCK_THREADS, 1, 1, shared, 0, args, 0), "cuLaunchKernel(mas_fused)")
            _ok(d.cuCtxSynchronize(), "cuCtxSynchronize")
            self.last_kernel_ms = (time.perf_counter() - t0) * 1e3
            for ptr, a in zip(bufs[len(host_in) :], host_out):
                _ok(d.cuMemcpyDtoH(a.ctypes.data, ptr, a.nbytes), "cuMemcpyDtoH")
        finally:
            for ptr in bufs:
                d.cuMemFree(ptr)
        saliency, relevance, change, red = host_out
        return MasScores(
            saliency=saliency,
            relevance=relevance,
            change=change if previous_tokens is not None else None,
            saliency_max=float(red[0]),
            grounding=float(red[1]),
            content_words=m if content_words is None else int(content_words),
            relevance_chance=chance_relevance(n, m, dt),
        )


def device_matrix(x: DeviceTensor, index: int = 0) -> DeviceTensor:
    """The (N, D) float32 matrix of image ``index`` in a device tensor of shape (N, D) or (B, N, D).

    Pure pointer arithmetic (no device access), so it is tested without a GPU.

    Raises:
        MasInputError: not float32, or not 2-D / 3-D.
    """
    if x.dtype != "float32":
        raise MasInputError(
            f"{x.name}: the MAS kernel reads float32, the device tensor is {x.dtype}; build the vision engine with float32 outputs"
        )
    if len(x.shape) == 3:
        return x.item(index)  # (B, N, D) -> (N, D) at byte offset index * N * D * 4
    if len(x.shape) != 2 or index != 0:
        raise MasInputError(f"{x.name}: expected a (N, D) or (B, N, D) device tensor, got shape {x.shape} at index {index}")
    return x


def encode_and_score_on_device(
    runner,
    kernel: CudaMas,
    pixel_values: np.ndarray,
    question_embeddings: np.ndarray,
    previous_tokens: np.ndarray | None = None,
    *,
    content_words: int | None = None,
) -> tuple[np.ndarray, MasScores]:
    """The vision engine, then the MAS kernel on its output buffers in place (no host round trip).

    Args:
        runner: a ``TrtRunner`` of the ``vision_encoder`` segment.
        pixel_values: float32 (3, H, W), one image.

    Returns:
        (image tokens (N, D) on the host, for the decoder; MAS scores). ``mas_features`` stays
        on the device: only the kernel reads it.
    """
    host, scores = runner.infer_with_device_outputs(
        {"pixel_values": pixel_values[None]},  # (3, H, W) -> (1, 3, H, W)
        lambda dev: kernel.scores_from_device(
            dev["mas_features"], dev["image_tokens"], question_embeddings, previous_tokens, content_words=content_words
        ),
        host_outputs=("image_tokens",),
    )
    return host["image_tokens"][0], scores
