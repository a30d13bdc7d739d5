"""A stand-in for a deserialised TensorRT engine, run by ONNX Runtime in host memory.

It lets ``TrtRunner``'s own logic run where there is no GPU: profile choice, shape and address
binding, the INT64 -> INT32 inputs of TensorRT 8.6 engines, and the KV ping-pong buffers. It
implements only the calls ``TrtRunner`` makes, as TensorRT documents them: ``set_input_shape``
refuses a shape outside the active profile, ``get_tensor_shape`` answers output shapes once the
inputs are set, ``execute_async_v3`` reads every input from, and writes every output to, the
address bound to it. It is not TensorRT: kernels, precision and device memory are only
checked on a GPU (tests/engines/test_tensorrt_gpu.py).
"""

from __future__ import annotations

import ctypes
from types import SimpleNamespace

import numpy as np

from msao.engines.bundle import Bundle
from msao.engines.manifest import SegmentSpec
from msao.engines.tensorrt_profiles import ShapeProfile

# The two enums TrtRunner reads from the tensorrt module; dtypes are numpy dtypes already.
TRT = SimpleNamespace(TensorIOMode=SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT"), nptype=lambda dt: dt)


def _view(ptr: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    raw = np.ctypeslib.as_array((ctypes.c_uint8 * max(n, 1)).from_address(ptr))[:n]
    return raw.view(dtype).reshape(shape)


class HostStream:
    handle = 0

    def synchronize(self) -> None:
        pass

    def close(self) -> None:
        pass


class HostBuffers:
    """``DeviceBuffers`` in host memory; ``uploads`` lists every key copied in, in order."""

    def __init__(self) -> None:
        self._bufs: dict[object, np.ndarray] = {}
        self.uploads: list[object] = []

    def ensure(self, key: object, nbytes: int) -> int:
        buf = self._bufs.get(key)
        if buf is None or buf.nbytes < nbytes:
            buf = self._bufs[key] = np.zeros(max(256, 2 * nbytes), np.uint8)
        return buf.ctypes.data

    def upload(self, key: object, array: np.ndarray, stream) -> int:
        ptr = self.ensure(key, array.nbytes)
        ctypes.memmove(ptr, array.ctypes.data, array.nbytes)
        self.uploads.append(key)
        return ptr

    def download(self, ptr: int, out: np.ndarray, stream) -> None:
        ctypes.memmove(out.ctypes.data, ptr, out.nbytes)

    def copy_rows(self, dst: int, dst_pitch: int, src: int, src_pitch: int, row_bytes: int, rows: int, stream) -> None:
        for r in range(rows):
            ctypes.memmove(dst + r * dst_pitch, src + r * src_pitch, row_bytes)

    def close(self) -> None:
        self._bufs.clear()


class OrtEngine:
    """The engine side. ``int64_as_int32`` makes INT64 inputs INT32, as TensorRT 8.6's parser does."""

    def __init__(self, bundle: Bundle, spec: SegmentSpec, profiles: tuple[ShapeProfile, ...], int64_as_int32: bool = False):
        import onnxruntime as ort

        self.spec = spec
        self.profiles = profiles
        self.session = ort.InferenceSession(bundle.read_verified(spec.file), providers=["CPUExecutionProvider"])
        narrow = {np.dtype("int64"): np.dtype("int32")} if int64_as_int32 else {}
        self.io = {t.name: ("INPUT", narrow.get(np.dtype(t.dtype), np.dtype(t.dtype)), t) for t in spec.inputs}
        self.io |= {t.name: ("OUTPUT", np.dtype(t.dtype), t) for t in spec.outputs}
        self.names = list(self.io)

    num_io_tensors = property(lambda self: len(self.names))
    num_optimization_profiles = property(lambda self: len(self.profiles))

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str) -> str:
        return self.io[name][0]

    def get_tensor_dtype(self, name: str) -> np.dtype:
        return self.io[name][1]

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else -1 for d in self.io[name][2].shape)

    def get_tensor_profile_shape(self, name: str, profile: int) -> list[tuple[int, ...]]:
        r = next(r for r in self.profiles[profile].inputs if r.name == name)
        return [r.min, r.opt, r.max]

    def create_execution_context(self) -> OrtContext:
        return OrtContext(self)


class OrtContext:
    def __init__(self, engine: OrtEngine):
        self.engine = engine
        self.profile = 0
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.profile_switches = 0

    def set_optimization_profile_async(self, profile: int, stream: int) -> bool:
        self.profile, self.shapes = profile, {}
        self.profile_switches += 1
        return 0 <= profile < len(self.engine.profiles)

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        r = next((r for r in self.engine.profiles[self.profile].inputs if r.name == name), None)
        if r is not None and not r.contains(tuple(shape)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name: str, ptr: int) -> None:
        self.addresses[name] = ptr

    def _shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name] if name in self.shapes else self.get_tensor_shape(name)

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        dims = {}
        for t in self.engine.spec.inputs:
            for size, d in zip(self.shapes[t.name], t.shape):
                if isinstance(d, str) and "+" not in d:
                    dims[d] = size
        return tuple(d if isinstance(d, int) else sum(dims[p] for p in d.split("+")) for d in self.engine.io[name][2].shape)

    def execute_async_v3(self, stream: int) -> bool:
        spec = self.engine.spec
        # TensorRT reads inputs while it writes outputs: an output bound over an input is a bug a
        # copy-everything-first stand-in would hide, so refuse it here.
        spans = {n: (a, a + _view(a, s, self.engine.io[n][1]).nbytes) for n, a in self.addresses.items() if (s := self._shape(n))}
        for o in (t.name for t in spec.outputs):
            for i in (t.name for t in spec.inputs):
                (a0, a1), (b0, b1) = spans[o], spans[i]
                assert a1 <= b0 or b1 <= a0 or a0 == a1 or b0 == b1, f"output {o} aliases input {i}"
        feeds = {t.name: _view(self.addresses[t.name], self.shapes[t.name], self.engine.io[t.name][1]).astype(t.dtype) for t in spec.inputs}
        for t, value in zip(spec.outputs, self.engine.session.run([t.name for t in spec.outputs], feeds)):
            _view(self.addresses[t.name], value.shape, value.dtype)[...] = value
        return True
