"""TensorRT backend: runs a segment from a prebuilt engine, behind the same interface as ONNX Runtime.

Owns deserialising hash-checked engines and running them; knows nothing of scheduling, MQTT
or how engines are built (``engine_builder``). ``tensorrt`` and ``cuda`` are imported inside
the functions that need them, so importing this module is free on a machine without either.

Targets the TensorRT API shared by 8.6 and 10.x: name-based I/O (``num_io_tensors``,
``get_tensor_name/mode/dtype``, ``get_tensor_profile_shape``), ``set_input_shape``,
``set_tensor_address`` and ``execute_async_v3``; nothing from the binding-index API that 10.0
removed. One difference matters at run time: under 8.6 the ONNX parser turns INT64 inputs
into INT32 engine inputs (10.x keeps INT64), so feeds are cast to the engine's own dtype.

Per runner: one execution context, one CUDA stream, device buffers that grow and are reused
across calls. A decoder chunk of a format 3 bundle (``run_chunk``) keeps a device copy of the
request's ``KvCache``: while the host cache is the one it mirrors (same epoch, no slot added
elsewhere), the past is bound in place and only the step's new slots move, device to device
into the copy and down to the host cache (T slots, not the cache). Format 1/2 chunks return
``present_*``, held in two ping-pong buffers each: when a decode step feeds back, as
``past_*``, the very array the previous step returned, the runner binds the device buffer that
already holds it; returned ``present_*`` arrays are read-only so that identity means equal
contents.

Untested on hardware: there was no GPU where this was written. tests/engines/test_tensorrt_gpu.py
compares it with ONNX Runtime wherever TensorRT and a GPU exist.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from msao.engines.backend import Backend, Runner, check_feeds, chunk_feeds
from msao.engines.cuda_buffers import CudaStream, DeviceBuffers, DeviceTensor, _cudart, device_properties
from msao.engines.engine_records import EngineTarget, find_engine, jetpack_from_l4t, read_engine_verified, read_l4t_release
from msao.engines.manifest import SegmentSpec
from msao.engines.tensorrt_profiles import InputRange, ShapeProfile, choose_profile
from msao.errors import EngineMismatch, FeedError, GpuUnavailable, MissingDependency, MsaoError

if TYPE_CHECKING:
    from msao.engines.bundle import Bundle
    from msao.engines.kv_cache import KvCache

__all__ = [
    "TENSORRT_INSTALL_HINT",
    "current_target",
    "import_tensorrt",
    "TensorRTBackend",
    "tensorrt_unavailable_reason",
    "TrtOptions",
    "TrtRunner",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

TENSORRT_INSTALL_HINT = (
    "TensorRT's Python bindings are not importable ({why}). On a Jetson (JetPack 6.x / 7) they come with JetPack: "
    "`sudo apt-get install python3-libnvinfer`, and the venv must see system packages "
    "(`python3 -m venv --system-site-packages .venv`). On an x86 machine with an NVIDIA GPU: `pip install tensorrt`. "
    "Device memory also needs cuda-python: `pip install 'msao[gpu]'`. See docs/tensorrt.md; until then segments run on ONNX Runtime"
)
MIN_VERSION = (8, 6)


def import_tensorrt():
    """The ``tensorrt`` module, 8.6 or newer.

    Raises:
        MissingDependency: not importable (with what to install) or too old.
    """
    try:
        import tensorrt as trt
    except ImportError as exc:  # also the OSError-free case where libnvinfer is missing behind the bindings
        raise MissingDependency(TENSORRT_INSTALL_HINT.format(why=f"{type(exc).__name__}: {exc}")) from exc
    version = tuple(int(x) for x in trt.__version__.split(".")[:2])
    if version < MIN_VERSION:
        raise MissingDependency(f"TensorRT {trt.__version__} is too old: msao needs 8.6 or 10.x (JetPack 6 ships them)")
    return trt


def current_target(trt, device: int = 0) -> EngineTarget:
    """This machine as an engine target: TensorRT version, GPU, and L4T/JetPack on a Jetson."""
    name, cc = device_properties(device)
    l4t = read_l4t_release()
    return EngineTarget(trt.__version__, name, cc, l4t, jetpack_from_l4t(l4t))


def tensorrt_unavailable_reason(device: int = 0) -> str | None:
    """None when TensorRT, cuda-python and a GPU all answer here; else why not (for logs and skips)."""
    try:
        current_target(import_tensorrt(), device)
    except (MissingDependency, GpuUnavailable) as exc:
        return str(exc)
    return None


@dataclass(frozen=True)
class TrtOptions:
    """Attributes:
    device: CUDA device ordinal.
    verbose: TensorRT's own log at INFO instead of WARNING.
    """

    device: int = 0
    verbose: bool = False


class TensorRTBackend(Backend):
    """Opens runners from the engines ``msao build-engines`` wrote for this TensorRT and GPU.

    Raises (on construction):
        MissingDependency: no TensorRT (with the install hint) or no cuda-python.
        GpuUnavailable: no driver or device.
    """

    name = "tensorrt"

    def __init__(self, options: TrtOptions = TrtOptions()):
        self._trt = trt = import_tensorrt()
        _cudart()
        self.options = options
        self.target = current_target(trt, options.device)
        self._logger = trt.Logger(trt.Logger.INFO if options.verbose else trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._warned: set[str] = set()

    def describe(self) -> str:
        return f"tensorrt {self.target.tensorrt_version} {self.target.gpu_name} sm{self.target.compute_capability}"

    def open(self, bundle: Bundle, spec: SegmentSpec) -> Runner:
        """A runner for ``spec`` from its engine (hash-checked before TensorRT sees a byte).

        Raises:
            BundleError: no engine for this segment. EngineMismatch: built for another
            TensorRT, GPU or export, or TensorRT refuses the plan. HashMismatch: altered file.
        """
        engine_set, record = find_engine(bundle, spec, self.target)
        built = engine_set.target
        if built.l4t_release != self.target.l4t_release and built.describe() not in self._warned:
            self._warned.add(built.describe())
            log.warning(
                "engines of %s were built on L4T %s, this is L4T %s (same TensorRT %s, so loading them); "
                "rebuild with `msao build-engines --bundle %s` if results look wrong",
                bundle.manifest.name, built.l4t_release or "-", self.target.l4t_release or "-", built.tensorrt_version, bundle.root,
            )  # fmt: skip
        plan = read_engine_verified(bundle.root, record)
        engine = self._runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise EngineMismatch(
                f"{bundle.root / record.file}: TensorRT {self.target.tensorrt_version} could not deserialise the engine "
                f"(see its log above); rebuild with `msao build-engines --bundle {bundle.root}`"
            )
        runner = TrtRunner(spec, engine, self._trt, self.options.device)
        runner.keepalive = self._runtime  # TensorRT wants the runtime to outlive its engines; the backend may not
        return runner


class TrtRunner(Runner):
    """Runs one engine. Thread-safe: calls are serialised (the edge shares runners across workers)."""

    providers = ("TensorRT",)

    def __init__(
        self, spec: SegmentSpec, engine, trt, device: int = 0, *, stream: CudaStream | None = None, buffers: DeviceBuffers | None = None
    ):
        """Args:
        engine: a deserialised ``ICudaEngine`` whose I/O names are the segment's.
        trt: the ``tensorrt`` module (for dtype and I/O-mode enums).
        stream / buffers: where to run and keep tensors (default: a new CUDA stream, device
            buffers); the runner owns and closes them.
        """
        super().__init__(spec)
        self._engine = engine
        io = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            io[name] = (engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT, np.dtype(trt.nptype(engine.get_tensor_dtype(name))))
        _check_engine_io(spec, io)
        self._dtype = {n: dt for n, (_, dt) in io.items()}
        self._inputs = [t.name for t in spec.inputs]
        self._outputs = [t.name for t in spec.outputs]
        self._spec_dtype = {t.name: np.dtype(t.dtype) for t in (*spec.inputs, *spec.outputs)}
        dynamic = [n for n in self._inputs if any(int(d) < 0 for d in engine.get_tensor_shape(n))]
        self.profiles = tuple(
            ShapeProfile(
                f"#{p}",
                tuple(InputRange(n, *(tuple(int(x) for x in dims) for dims in engine.get_tensor_profile_shape(n, p))) for n in dynamic),
            )
            for p in range(engine.num_optimization_profiles)
        )
        outputs = set(self._outputs)
        self._past_of = {
            n: "present_" + n[len("past_") :] for n in self._inputs if n.startswith("past_") and "present_" + n[len("past_") :] in outputs
        }
        self._stream = stream or CudaStream(device)
        self._buffers = buffers or DeviceBuffers()
        self._context = engine.create_execution_context()  # implicitly on profile 0
        self._profile = 0
        self._lock = threading.RLock()
        self._resident: dict[str, tuple[np.ndarray, int]] = {}  # present name -> (array returned last, ping-pong slot)
        self._device_out: dict[str, DeviceTensor] = {}
        self._mirror: tuple[int, int] = (0, 0)  # (epoch, length) of the KvCache whose past the ("kv", name) buffers hold
        self.keepalive: object = None  # what the engine needs alive (its runtime), released after it in close()

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._run(feeds, None)

    def run_chunk(self, feeds: dict[str, np.ndarray], cache: KvCache) -> dict[str, np.ndarray]:
        if self._past_of or cache.whole:  # format 1/2: present_* ping-pong (see the module docstring)
            return super().run_chunk(feeds, cache)
        t, full = chunk_feeds(self.spec, feeds, cache)
        check_feeds(self.spec, full)
        with self._lock:
            t0 = time.perf_counter()
            resident = self._mirror == (cache.epoch, cache.length)
            bound = {}
            for name in cache.names:  # not resident: the whole host buffer, zeros in unused slots (cudaMalloc'd memory may hold NaNs)
                buf, key = cache.buffer(name), ("kv", name)
                bound[name] = self._buffers.ensure(key, buf.nbytes) if resident else self._buffers.upload(key, buf, self._stream)
            out = self._run(full, None, bound=bound)
            fits = cache.length + t <= cache.capacity  # else the host cache grows (new epoch) and is uploaded next call
            if fits:
                for name in cache.names:
                    new = self._device_out["new_" + name[len("past_") :]]
                    b, h, cap, d = cache.buffer(name).shape
                    slot = d * np.dtype(new.dtype).itemsize  # bytes of one token's key (or value) in one head
                    rows = t * slot  # (B * Hkv) rows of T slots: from the packed output into the buffer's [length, length + T)
                    self._buffers.copy_rows(bound[name] + cache.length * slot, cap * slot, new.ptr, rows, rows, b * h, self._stream)
                self._stream.synchronize()
            cache.append(out, t)
            self._mirror = (cache.epoch, cache.length) if fits else (0, 0)
            self.last_latency_ms = (time.perf_counter() - t0) * 1e3
        return out

    def _run(
        self, feeds: dict[str, np.ndarray], download: Collection[str] | None, bound: dict[str, int] | None = None
    ) -> dict[str, np.ndarray]:
        with self._lock:
            ctx, stream = self._context, self._stream
            profile = choose_profile(self.profiles, {n: a.shape for n, a in feeds.items()}, f"segment {self.spec.name}")
            if profile != self._profile:
                if not ctx.set_optimization_profile_async(profile, stream.handle):
                    raise MsaoError(f"segment {self.spec.name}: TensorRT refused optimisation profile {profile}")
                self._profile = profile
            write_slot: dict[str, int] = {}
            for name in self._inputs:
                arr = feeds[name]
                present = self._past_of.get(name)
                held = self._resident.get(present) if present else None
                if bound and name in bound:  # already on the device (``run_chunk``'s copy of the KV cache)
                    ptr = bound[name]
                elif present and held is not None and held[0] is arr:
                    ptr = self._buffers.ensure((present, held[1]), arr.nbytes)  # holds arr already: no growth, no copy
                    write_slot[present] = 1 - held[1]
                else:
                    ptr = self._buffers.upload(name, self._to_engine(name, arr), stream)
                if not ctx.set_input_shape(name, tuple(arr.shape)):
                    raise FeedError(f"segment {self.spec.name}: TensorRT refused shape {arr.shape} for input {name}")
                ctx.set_tensor_address(name, ptr)
            host: dict[str, np.ndarray] = {}
            self._device_out = {}
            for name in self._outputs:
                shape = tuple(int(d) for d in ctx.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise MsaoError(f"segment {self.spec.name}: output {name} has a data-dependent shape {shape}; not supported")
                out = np.empty(shape, self._dtype[name])
                if name in self._past_of.values():
                    slot = write_slot.get(name, 1 - self._resident[name][1] if name in self._resident else 0)
                    write_slot[name] = slot
                    ptr = self._buffers.ensure((name, slot), out.nbytes)
                else:
                    ptr = self._buffers.ensure(name, out.nbytes)
                ctx.set_tensor_address(name, ptr)
                host[name] = out
                self._device_out[name] = DeviceTensor(name, ptr, shape, out.dtype.name, stream.handle)
            if not ctx.execute_async_v3(stream.handle):
                raise MsaoError(
                    f"segment {self.spec.name}: TensorRT execution failed (see its log); try ONNX Runtime or rebuild the engine"
                )
            wanted = self._outputs if download is None else [n for n in self._outputs if n in download]
            for name in wanted:
                self._buffers.download(self._device_out[name].ptr, host[name], stream)
            stream.synchronize()
            result = {}
            for name in wanted:
                out = host[name] if host[name].dtype == self._spec_dtype[name] else host[name].astype(self._spec_dtype[name])
                if name in write_slot:
                    out.flags.writeable = False  # identity must keep meaning "same contents" (see module docstring)
                    self._resident[name] = (out, write_slot[name])
                result[name] = out
            for name in write_slot.keys() - set(wanted):
                self._resident.pop(name, None)
            return result

    def _to_engine(self, name: str, arr: np.ndarray) -> np.ndarray:
        """C-contiguous, in the engine's dtype (INT64 -> INT32 under TensorRT 8.6, range-checked)."""
        want = self._dtype[name]
        if arr.dtype != want and want == np.int32 and arr.size and np.abs(arr).max() > np.iinfo(np.int32).max:
            raise FeedError(
                f"segment {self.spec.name}: input {name} holds values beyond INT32, which this TensorRT 8.6 engine uses for INT64"
            )
        return np.ascontiguousarray(arr, dtype=want)

    def infer_with_device_outputs(
        self, feeds: dict[str, np.ndarray], consume: Callable[[dict[str, DeviceTensor]], T], host_outputs: Collection[str] | None = None
    ) -> tuple[dict[str, np.ndarray], T]:
        """Run, then hand the outputs' device buffers to ``consume`` before they can be reused.

        ``consume`` runs after the stream is synchronised and while this runner is locked;
        it may launch GPU work that reads the buffers (e.g. ``CudaMas.scores_from_device``)
        but must finish with it, and keep no pointer, before returning. Outputs not in
        ``host_outputs`` (default: all) are not copied to the host.

        Returns:
            (host outputs by name, whatever ``consume`` returned).
        """
        check_feeds(self.spec, feeds)
        with self._lock:
            t0 = time.perf_counter()
            host = self._run(feeds, host_outputs)
            result = consume(dict(self._device_out))
            self.last_latency_ms = (time.perf_counter() - t0) * 1e3
        return host, result

    def close(self) -> None:
        with self._lock:
            if self._engine is None:
                return
            self._context = None
            self._engine = None
            self.keepalive = None
            self._buffers.close()
            self._stream.close()
            self._resident.clear()


def _check_engine_io(spec: SegmentSpec, io: dict[str, tuple[bool, np.dtype]]) -> None:
    """The engine's named I/O must be the segment's; the dtype may narrow INT64 to INT32 (8.6)."""
    problems = []
    want = {t.name: (True, np.dtype(t.dtype)) for t in spec.inputs} | {t.name: (False, np.dtype(t.dtype)) for t in spec.outputs}
    for name in sorted(set(want) | set(io)):
        if name not in io:
            problems.append(f"{name}: in the manifest, not in the engine")
        elif name not in want:
            problems.append(f"{name}: in the engine, not in the manifest")
        elif io[name][0] != want[name][0]:
            problems.append(f"{name}: {'input' if want[name][0] else 'output'} in the manifest, not in the engine")
        elif io[name][1] != want[name][1] and not (want[name][1] == np.int64 and io[name][1] == np.int32):
            problems.append(f"{name}: engine dtype {io[name][1]}, manifest {want[name][1]}")
    if problems:
        raise EngineMismatch(
            f"segment {spec.name}: engine I/O differs from the manifest: " + "; ".join(problems) + "; rebuild with `msao build-engines`"
        )
