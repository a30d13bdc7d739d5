"""The tensor codec: exact round trips, plain safetensors on the wire, and refusal of every malformed payload."""

from __future__ import annotations

import io
import json
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from msao.cloud_bridge.codec import ZSTD_MAGIC, CodecLimits, payload_from_tensors, tensors_from_payload
from msao.cloud_bridge.messages import JobHeader
from msao.errors import CodecError, PayloadTooLarge
from tests.strategies import wire_metadata, wire_tensor_dicts

GOLDEN = Path(__file__).parent / "golden" / "split_job_v1.safetensors"


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()  # bit-exact, NaN payloads included


@settings(max_examples=150, deadline=None)
@given(tensors=wire_tensor_dicts, metadata=wire_metadata, compress=st.booleans())
def test_decode_of_encode_is_identity_for_all_dtypes_shapes_and_compression(tensors, metadata, compress):
    payload = payload_from_tensors(tensors, metadata, compress=compress)
    assert payload[:4] == ZSTD_MAGIC if compress else payload[:4] != ZSTD_MAGIC
    out = tensors_from_payload(payload)
    assert dict(out.metadata) == metadata and set(out.tensors) == set(tensors)
    assert all(_same(out.tensors[k], np.asarray(v)) for k, v in tensors.items())
    assert out.compressed == compress and out.wire_bytes == len(payload)


def test_payload_is_plain_safetensors_readable_by_the_reference_library_and_back():
    st_numpy = pytest.importorskip("safetensors.numpy")
    x = {"h": np.arange(24, dtype=np.float16).reshape(2, 3, 4), "ids": np.arange(5, dtype=np.int64), "empty": np.zeros((0, 4), np.float32)}
    ours = payload_from_tensors(x, {"job_id": "j1"})
    theirs = st_numpy.load(ours)
    assert all(_same(theirs[k], v) for k, v in x.items())
    back = tensors_from_payload(st_numpy.save(x, metadata={"job_id": "j1"}))
    assert all(_same(back.tensors[k], v) for k, v in x.items()) and back.metadata == {"job_id": "j1"}


def _golden_job() -> tuple[dict[str, np.ndarray], dict[str, str]]:
    header = JobHeader("golden-job-1", "ab" * 32, "split", 1.5e9, segment="decoder[2:4]", session_id="s1")
    tensors = {
        "hidden_states": (np.arange(8, dtype=np.float16) / 8).reshape(1, 2, 4),
        "position_ids": np.array([[0, 1]], np.int64),
        "attention_mask": np.array([[1, 1]], np.int64),
    }
    return tensors, header.to_metadata()


def test_split_job_bytes_match_the_golden_file_of_layout_1():
    # A change here changes the wire format: bump LAYOUT_VERSION and regenerate the golden file on purpose.
    tensors, metadata = _golden_job()
    assert payload_from_tensors(tensors, metadata) == GOLDEN.read_bytes()
    assert JobHeader.from_metadata(tensors_from_payload(GOLDEN.read_bytes()).metadata).segment == "decoder[2:4]"


def test_decoded_arrays_are_read_only_views_and_aligned():
    out = tensors_from_payload(payload_from_tensors({"a": np.ones((3, 5), np.float16), "b": np.ones(7, np.float64)}))
    for x in out.tensors.values():
        assert not x.flags.writeable and x.ctypes.data % x.dtype.itemsize == 0


def _raw(header: dict, data: bytes = b"", hlen: int | None = None) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h) if hlen is None else hlen) + h + data


@pytest.mark.parametrize(
    "payload, match",
    [
        (b"", "shorter than the 8-byte"),
        (b"\x01\x00\x00", "shorter than the 8-byte"),
        (_raw({}, hlen=1000), "runs past the payload"),
        (struct.pack("<Q", 2**40) + b"{}", "over the limit"),
        (_raw({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}, b"\0" * 12), r"needs 16 bytes, data_offsets give 12"),
        (_raw({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4), "past the data"),
        (_raw({"a": {"dtype": "BF16", "shape": [1], "data_offsets": [0, 2]}}, b"\0" * 2), "dtype 'BF16' is not supported"),
        (_raw({"a": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}}, b"\0"), "dtype 'Q4' is not supported"),
        (_raw({"a": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 1]}}, b"\0"), "non-negative ints"),
        (_raw({"a": {"dtype": "U8", "shape": [True], "data_offsets": [0, 1]}}, b"\0"), "non-negative ints"),
        (_raw({"a": {"dtype": "U8", "shape": [1], "data_offsets": [1, 0]}}, b"\0"), "begin <= end"),
        (_raw({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1], "x": 1}}, b"\0"), "exactly dtype, shape, data_offsets"),
        (
            _raw(
                {"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}, "b": {"dtype": "U8", "shape": [2], "data_offsets": [1, 3]}},
                b"\0" * 3,
            ),
            "overlaps",
        ),
        (_raw({"a": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}, b"\0\0"), "leaves a hole"),
        (_raw({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"\0\0"), "cover 1"),
        (_raw({"a": {"dtype": "BOOL", "shape": [1], "data_offsets": [0, 1]}}, b"\x07"), "BOOL bytes must be 0 or 1"),
        (_raw({"__metadata__": {"k": 1}}), "strings to strings"),
        (_raw([1, 2]), "must be a JSON object"),
        (struct.pack("<Q", 4) + b"\xff\xfe{}", "not valid JSON"),
        (struct.pack("<Q", 12) + b'{"a":1,"a":2}'[:12], "not valid JSON"),
        (_raw({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, "b": 1}, b"\0"), "exactly dtype"),
        (struct.pack("<Q", 14) + b'{"a":NaN,"b":1}'[:14], "not JSON|not valid JSON"),
        (ZSTD_MAGIC + b"\x00garbage", "frame header is invalid|corrupt|content size"),
    ],
)
def test_malformed_payloads_are_refused_with_a_clear_error(payload, match):
    with pytest.raises(CodecError, match=match):
        tensors_from_payload(payload)


def test_duplicate_header_keys_are_refused():
    h = b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}'
    with pytest.raises(CodecError, match="repeats the key 'a'"):
        tensors_from_payload(struct.pack("<Q", len(h)) + h + b"\0")


def _streamed_zeros(total: int, declare_size: bool) -> bytes:
    buf = io.BytesIO()
    with zstandard.ZstdCompressor(level=1).stream_writer(buf, size=total if declare_size else -1, closefd=False) as w:
        block = bytes(1 << 20)
        for _ in range(total >> 20):
            w.write(block)
    return buf.getvalue()


def test_zstd_bomb_declaring_its_size_is_refused_before_allocating():
    bomb = _streamed_zeros(256 << 20, declare_size=True)  # 256 MiB of zeros in a few KiB
    assert len(bomb) < 64 * 1024
    tracemalloc.start()
    with pytest.raises(PayloadTooLarge, match="declares 268435456 bytes, over the limit"):
        tensors_from_payload(bomb, CodecLimits(max_payload_bytes=16 << 20))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 20


def test_zstd_frame_without_content_size_is_refused():
    with pytest.raises(CodecError, match="does not declare its content size"):
        tensors_from_payload(_streamed_zeros(8 << 20, declare_size=False))


def test_zstd_frame_holding_more_than_it_declares_is_refused():
    body = payload_from_tensors({"a": np.zeros(1000, np.uint8)})
    frame = bytearray(zstandard.ZstdCompressor(level=1, write_content_size=True).compress(body + b"\0" * 5000))
    fake = zstandard.ZstdCompressor(level=1, write_content_size=True).compress(body)
    # splice the smaller frame's header (its content size) onto the larger frame's blocks
    head = zstandard.frame_header_size(fake)
    lying = fake[:head] + bytes(frame[zstandard.frame_header_size(bytes(frame)) :])
    with pytest.raises(CodecError):
        tensors_from_payload(lying)


def test_payload_over_the_wire_limit_is_refused_without_parsing():
    with pytest.raises(PayloadTooLarge, match="over the limit 100"):
        tensors_from_payload(b"x" * 101, CodecLimits(max_payload_bytes=100))


@pytest.mark.parametrize(
    "tensors, metadata, match",
    [
        ({"a": np.array(["x"])}, {}, "cannot be sent"),
        ({"a": np.zeros(2, np.complex64)}, {}, "cannot be sent"),
        ({"": np.zeros(1)}, {}, "non-empty strings"),
        ({"__metadata__": np.zeros(1)}, {}, "other than __metadata__"),
        ({}, {"n": 3}, "format numbers as strings"),
    ],
)
def test_encoder_refuses_what_it_cannot_send(tensors, metadata, match):
    with pytest.raises(CodecError, match=match):
        payload_from_tensors(tensors, metadata)
