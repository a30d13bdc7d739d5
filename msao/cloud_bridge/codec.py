"""The tensor codec: named NumPy arrays + a string metadata dict <-> safetensors bytes, optionally zstd.

Owns the byte layout of every job and result; knows nothing of MQTT, models or placement.
Written and parsed here with NumPy alone (no torch, no ``safetensors`` package) so the edge
install stays small; the layout is plain safetensors, so any safetensors reader can open a
captured payload (tests check that against the reference library).

    payload = zstd( safetensors ) | safetensors           (zstd frames start with 28 B5 2F FD)
    safetensors = u64 LE header length N | N bytes JSON header (space-padded to 8) | data
    header = {"__metadata__": {str: str}, name: {"dtype": "F32", "shape": [..], "data_offsets": [b, e]}, ...}

Decoding trusts nothing: every size is checked against the bytes actually present and against
``CodecLimits`` *before* anything is allocated; the tensors' byte ranges must tile the data
exactly (no holes, no overlaps); a zstd frame must declare its content size, which must be
within the limit, and is then decompressed by a bounded stream read. msao never pickles.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from msao.errors import CodecError, PayloadTooLarge

__all__ = [
    "DTYPE_NAMES",
    "ZSTD_MAGIC",
    "CodecLimits",
    "compress_payload",
    "DecodedPayload",
    "dequantize_rows",
    "quantize_rows",
    "payload_from_tensors",
    "tensors_from_payload",
]

# numpy dtype name -> safetensors dtype tag (little-endian on the wire)
DTYPE_NAMES: dict[str, str] = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint64": "U64",
    "uint32": "U32",
    "uint16": "U16",
    "uint8": "U8",
    "bool": "BOOL",
}
_NUMPY_OF_TAG = {tag: np.dtype(name).newbyteorder("<") for name, tag in DTYPE_NAMES.items()}
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_ALIGN = 8
_HINT = "the sender is not msao, is a different version, or the bytes were cut; re-send with a current msao"


@dataclass(frozen=True)
class CodecLimits:
    """Upper bounds applied while decoding untrusted bytes.

    Attributes:
        max_payload_bytes: largest safetensors body accepted, after decompression; also the
            largest compressed payload. Bigger jobs get a ``PayloadTooLarge``.
        max_header_bytes: largest JSON header (names, shapes, metadata); real ones are < 4 KiB.
        max_tensors: most tensors in one payload.
        max_rank: most dimensions per tensor.
    """

    max_payload_bytes: int = 64 * 1024 * 1024
    max_header_bytes: int = 1024 * 1024
    max_tensors: int = 256
    max_rank: int = 8

    def __post_init__(self) -> None:
        if min(self.max_payload_bytes, self.max_header_bytes, self.max_tensors, self.max_rank) <= 0:
            raise ValueError(f"codec limits must be positive, got {self}")


@dataclass(frozen=True)
class DecodedPayload:
    """A decoded payload.

    Attributes:
        tensors: name -> read-only array viewing the payload's bytes (no copy).
        metadata: the safetensors ``__metadata__`` dict (strings only).
        wire_bytes: size as received.
        body_bytes: size of the safetensors body (after decompression).
        compressed: whether the payload was a zstd frame.
    """

    tensors: Mapping[str, np.ndarray]
    metadata: Mapping[str, str]
    wire_bytes: int
    body_bytes: int
    compressed: bool


def payload_from_tensors(
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
    *,
    compress: bool = False,
    level: int = 1,
) -> bytes:
    """Encode arrays and metadata as safetensors bytes, zstd-compressed when ``compress``.

    Tensors are laid out largest item size first (then by name), so every tensor starts
    aligned to its item size when the body is 8-aligned, and the JSON header is padded to 8.

    Args:
        tensors: name -> array of a dtype in ``DTYPE_NAMES`` (any shape, zero-size included).
        metadata: string -> string; job ids, hashes, numbers as decimal strings.
        compress: wrap in one zstd frame that records its content size.
        level: zstd level (1 is fast and already shrinks fp16 activations a little).

    Raises:
        CodecError: a name or metadata entry is not a string, or a dtype is not supported.
    """
    header: dict[str, object] = {}
    md = dict(metadata or {})
    for k, v in md.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise CodecError(f"metadata must map str to str, got {k!r}: {type(v).__name__}; format numbers as strings")
    if md:
        header["__metadata__"] = md
    arrays: list[tuple[str, np.ndarray]] = []
    for name, x in tensors.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise CodecError(f"tensor names must be non-empty strings other than __metadata__, got {name!r}")
        x = np.asarray(x)
        tag = DTYPE_NAMES.get(x.dtype.name)
        if tag is None:
            raise CodecError(f"tensor {name!r}: dtype {x.dtype} cannot be sent; use one of {sorted(DTYPE_NAMES)}")
        arrays.append((name, np.asarray(x, dtype=x.dtype.newbyteorder("<"), order="C")))  # keeps 0-d shapes
    arrays.sort(key=lambda item: (-item[1].dtype.itemsize, item[0]))
    offset = 0
    for name, x in arrays:
        header[name] = {"dtype": DTYPE_NAMES[x.dtype.name], "shape": list(x.shape), "data_offsets": [offset, offset + x.nbytes]}
        offset += x.nbytes
    hjson = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    hjson += b" " * (-(8 + len(hjson)) % _ALIGN)
    # one copy of each tensor's bytes, straight into the result
    out = b"".join([struct.pack("<Q", len(hjson)), hjson, *(x for _, x in arrays)])
    return compress_payload(out, level) if compress else out


def quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 rows with one float32 scale each (max |row| / 127): a quarter of float32's bytes.

    Symmetric per row because image tokens differ in norm by orders of magnitude between rows,
    so one scale for the whole tensor would flatten the small rows to zero.
    """
    x = np.asarray(x, np.float32)
    if x.ndim != 2 or not np.isfinite(x).all():
        raise CodecError(f"quantize_rows takes a finite 2-D array, got {x.dtype} {x.shape}")
    scale = np.abs(x).max(axis=1) / 127.0 if x.size else np.zeros(x.shape[0], np.float32)
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    return np.clip(np.rint(x / scale[:, None]), -127, 127).astype(np.int8), scale


def dequantize_rows(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """float32 rows back from ``quantize_rows``; ``CodecError`` when the two do not fit together."""
    if q.dtype != np.int8 or q.ndim != 2 or scale.dtype != np.float32 or scale.shape != (q.shape[0],):
        raise CodecError(f"int8 rows (K, D) need float32 scales (K,), got {q.dtype} {q.shape} and {scale.dtype} {scale.shape}")
    if not (np.isfinite(scale).all() and (scale > 0).all()):
        raise CodecError("row scales must be finite and > 0")
    return q.astype(np.float32) * scale[:, None]


def compress_payload(body: bytes, level: int = 1) -> bytes:
    """One zstd frame around an encoded payload, recording its content size (decoders require it)."""
    import zstandard

    return zstandard.ZstdCompressor(level=level, write_content_size=True).compress(body)


def tensors_from_payload(data: bytes | bytearray | memoryview, limits: CodecLimits = CodecLimits()) -> DecodedPayload:
    """Decode a payload written by ``payload_from_tensors`` (or any plain safetensors bytes).

    Raises:
        PayloadTooLarge: wire size, declared zstd content size or header over ``limits``.
        CodecError: anything malformed; the message names the tensor and got vs expected.
    """
    view = memoryview(data).cast("B")
    wire = len(view)
    if wire > limits.max_payload_bytes:
        raise PayloadTooLarge(
            f"payload is {wire} bytes, over the limit {limits.max_payload_bytes}; split the job or raise --max-payload-mb"
        )
    compressed = bytes(view[:4]) == ZSTD_MAGIC
    body = _decompress(view, limits) if compressed else view
    tensors, metadata = _parse_safetensors(body, limits)
    return DecodedPayload(tensors=tensors, metadata=metadata, wire_bytes=wire, body_bytes=len(body), compressed=compressed)


def _decompress(view: memoryview, limits: CodecLimits) -> memoryview:
    import zstandard

    try:
        size = zstandard.frame_content_size(view)
    except zstandard.ZstdError as exc:
        raise CodecError(f"payload starts like zstd but its frame header is invalid ({exc}); {_HINT}") from exc
    if size < 0:
        raise CodecError("zstd frame does not declare its content size; msao payloads always do (refusing an unbounded decompress)")
    if size > limits.max_payload_bytes:
        raise PayloadTooLarge(f"zstd frame declares {size} bytes, over the limit {limits.max_payload_bytes}; refusing to decompress")
    window = 1 << max(10, min(27, max(size, 1).bit_length()))
    out = bytearray(size)
    try:
        reader = zstandard.ZstdDecompressor(max_window_size=window).stream_reader(view, read_across_frames=False)
        got = 0
        while got < size:
            n = reader.readinto(memoryview(out)[got:])
            if n == 0:
                break
            got += n
        extra = reader.read(1)
    except zstandard.ZstdError as exc:
        raise CodecError(f"zstd payload is corrupt ({exc}); {_HINT}") from exc
    if got != size or extra:
        raise CodecError(f"zstd frame declared {size} bytes but held {'more' if extra else got}; {_HINT}")
    return memoryview(out)


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    d: dict[str, object] = {}
    for k, v in pairs:
        if k in d:
            raise CodecError(f"safetensors header repeats the key {k!r}")
        d[k] = v
    return d


def _parse_safetensors(body: memoryview, limits: CodecLimits) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    total = len(body)
    if total < 8:
        raise CodecError(f"payload is {total} bytes, shorter than the 8-byte safetensors header length; {_HINT}")
    (hlen,) = struct.unpack_from("<Q", body, 0)
    if hlen > limits.max_header_bytes:
        raise PayloadTooLarge(f"safetensors header length is {hlen} bytes, over the limit {limits.max_header_bytes}; {_HINT}")
    if 8 + hlen > total:
        raise CodecError(f"safetensors header length {hlen} runs past the payload ({total} bytes in all); truncated? {_HINT}")
    try:
        header = json.loads(bytes(body[8 : 8 + hlen]).decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError, JSONDecodeError, ints over 4300 digits
        raise CodecError(f"safetensors header is not valid JSON ({exc}); {_HINT}") from exc
    if not isinstance(header, dict):
        raise CodecError(f"safetensors header must be a JSON object, got {type(header).__name__}; {_HINT}")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CodecError("safetensors __metadata__ must map strings to strings")
    if len(header) > limits.max_tensors:
        raise PayloadTooLarge(f"payload holds {len(header)} tensors, over the limit {limits.max_tensors}")
    data = body[8 + hlen :]
    spans: list[tuple[int, int, str]] = []
    entries: list[tuple[str, np.dtype, tuple[int, ...], int, int]] = []
    for name, entry in header.items():
        dtype, shape, begin, end = _check_entry(name, entry, limits)
        if end > len(data):
            raise CodecError(f"tensor {name!r}: data_offsets end {end} is past the data ({len(data)} bytes); truncated? {_HINT}")
        want = int(np.prod(shape, dtype=object)) * dtype.itemsize
        if end - begin != want:
            raise CodecError(
                f"tensor {name!r}: shape {list(shape)} x {dtype.name} needs {want} bytes, data_offsets give {end - begin}; {_HINT}"
            )
        spans.append((begin, end, name))
        entries.append((name, dtype, shape, begin, end))
    pos = 0
    for begin, end, name in sorted(spans):
        if begin != pos:
            what = "overlaps the previous tensor" if begin < pos else f"leaves a hole at byte {pos}"
            raise CodecError(f"tensor {name!r}: data_offsets [{begin}, {end}] {what}; safetensors data must be tiled exactly")
        pos = end
    if pos != len(data):
        raise CodecError(f"safetensors data is {len(data)} bytes but the tensors cover {pos}; {_HINT}")
    tensors: dict[str, np.ndarray] = {}
    for name, dtype, shape, begin, end in entries:
        if end == begin:
            try:
                x = np.zeros(shape, dtype)
            except ValueError as exc:  # e.g. [0, 2**61, 2**61]: "array is too big" even with a zero dim
                raise CodecError(f"tensor {name!r}: shape {list(shape)} is too large for an array ({exc}); {_HINT}") from None
        else:
            x = np.frombuffer(data, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=begin).reshape(shape)
        if dtype.kind == "b" and x.size and int(x.view(np.uint8).max()) > 1:
            raise CodecError(f"tensor {name!r}: BOOL bytes must be 0 or 1")
        x.flags.writeable = False
        tensors[name] = x
    return tensors, dict(metadata)


def _no_constant(name: str) -> None:
    raise CodecError(f"safetensors header contains {name}, which is not JSON")


def _check_entry(name: str, entry: object, limits: CodecLimits) -> tuple[np.dtype, tuple[int, ...], int, int]:
    if not name:
        raise CodecError("safetensors header has a tensor with an empty name")
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise CodecError(f"tensor {name!r}: entry must have exactly dtype, shape, data_offsets; got {keys}")
    tag = entry["dtype"]
    if not isinstance(tag, str) or tag not in _NUMPY_OF_TAG:
        raise CodecError(f"tensor {name!r}: dtype {tag!r} is not supported; msao sends {sorted(_NUMPY_OF_TAG)}")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not isinstance(shape, list) or len(shape) > limits.max_rank or not all(_is_count(d) for d in shape):
        raise CodecError(f"tensor {name!r}: shape must be a list of at most {limits.max_rank} non-negative ints, got {shape!r}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets) or offsets[0] > offsets[1]:
        raise CodecError(f"tensor {name!r}: data_offsets must be [begin, end] with 0 <= begin <= end, got {offsets!r}")
    return _NUMPY_OF_TAG[tag], tuple(shape), offsets[0], offsets[1]


def _is_count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 62
