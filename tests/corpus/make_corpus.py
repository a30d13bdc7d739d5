"""Write the bad-input corpus under tests/corpus/<target>/ (files + manifest.json), deterministically.

    .venv/bin/python -m tests.corpus.make_corpus            # rewrite tests/corpus/*/
    .venv/bin/python -m tests.corpus.make_corpus --out DIR  # somewhere else (the tests compare)

Every case is refused: the manifest names the typed error the in-process parser raises and
the answer a real daemon or worker gives (see ``tests/corpus/corpus.py``). Bombs are small
files that would expand hugely (a 4100x4100 PNG of 16 KB, zstd frames of 16 MiB in a few
hundred bytes, PNG text chunks of 8 MiB in 8 KB); oversize cases are just over the limits in
``corpus.py``. Random bytes come from seeded generators; no clock, no host state.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import random
import shutil
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

from msao.cloud_bridge.codec import payload_from_tensors
from tests.corpus.corpus import (
    CORPUS_DIR,
    FAR_DEADLINE_UNIX_S,
    JOB_MAX_PAYLOAD_BYTES,
    PLACEHOLDER_HASH,
    REQUEST_MAX_PAYLOAD_BYTES,
    TARGETS,
)

__all__ = ["write_corpus"]

REQ_LIMIT = REQUEST_MAX_PAYLOAD_BYTES
Q = "what color is the shape?"


# -- images -----------------------------------------------------------------------------------

PNG_SIG = b"\x89PNG\r\n\x1a\n"


def _chunk(tag: bytes, data: bytes, crc: int | None = None) -> bytes:
    c = zlib.crc32(tag + data) & 0xFFFFFFFF if crc is None else crc
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", c)


def png(
    w: int,
    h: int,
    *,
    color: int = 2,
    depth: int = 8,
    pixels: bytes | None = None,
    idat: bytes | None = None,
    before_idat: tuple[bytes, ...] = (),
    ihdr: bytes | None = None,
) -> bytes:
    """A PNG written by hand (zlib level 9), so the bytes do not depend on Pillow's encoder."""
    if idat is None:
        if pixels is None:
            bpp = {0: 1, 2: 3, 4: 2, 6: 4}[color] * depth // 8
            pixels = (b"\0" + bytes(w * bpp)) * h
        idat = zlib.compress(pixels, 9)
    head = ihdr if ihdr is not None else struct.pack(">IIBBBBB", w, h, depth, color, 0, 0, 0)
    return PNG_SIG + _chunk(b"IHDR", head) + b"".join(before_idat) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _good_png() -> bytes:
    rows = b"".join(b"\0" + bytes(v for x in range(16) for v in (x * 16, y * 16, 128)) for y in range(16))
    return png(16, 16, pixels=rows)


GOOD_PNG = _good_png()
GOOD_B64 = base64.b64encode(GOOD_PNG).decode("ascii")


def _pillow(fmt: str, **kw) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _header65k() -> bytes:
    return png(65535, 65535, idat=zlib.compress(b"\0" * 64))


def _patch_jpeg_sof(jpeg: bytes, h: int, w: int) -> bytes:
    i = jpeg.index(b"\xff\xc0")
    return jpeg[: i + 5] + struct.pack(">HH", h, w) + jpeg[i + 9 :]


def _bmp(w: int, h: int, pixels: bytes | None = None, bpp: int = 24) -> bytes:
    row = (w * bpp // 8 + 3) & ~3
    data = pixels if pixels is not None else b""
    info = struct.pack("<IiiHHIIiiII", 40, w, h, 1, bpp, 0, min(row * abs(h), 0xFFFFFFFF), 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + 40 + len(data), 0, 0, 54) + info + data


def _tiff(w: int, h: int) -> bytes:
    entries = [(256, 4, 1, w), (257, 4, 1, h), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1), (273, 4, 1, 8), (278, 4, 1, h),
               (279, 4, 1, min(w * h, 0xFFFFFFFF))]  # fmt: skip
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + struct.pack("<I", 0)
    return b"II*\0" + struct.pack("<I", 8) + ifd


def image_cases() -> list[dict[str, Any]]:
    """(name, bytes, what, match): bytes decode_image must refuse with an ImageError."""
    jpeg = _pillow("JPEG", quality=75)
    gif = _pillow("GIF")
    webp = _pillow("WEBP", lossless=True)
    rng = random.Random(20260101)
    bomb_rows = (b"\0" + bytes(4100)) * 4100  # 16.8 Mpx of grey, over MAX_IMAGE_PIXELS (16.7 Mpx)
    text_bomb = zlib.compress(bytes(8 << 20), 9)  # 8 MiB of zeros, over Pillow's 1 MiB text/ICC limit
    webp_huge = bytearray(webp)
    k = webp.index(b"VP8L") + 9
    webp_huge[k : k + 4] = struct.pack("<I", 0x3FFF | (0x3FFF << 14) | (1 << 28))
    gif_huge = bytearray(gif)
    gif_huge[6:10] = struct.pack("<HH", 65535, 65535)  # the logical screen, which Pillow reports as the size
    # fmt: off
    cases = [
        # truncated
        ("png_signature_only", PNG_SIG, "PNG signature and nothing else", "decode"),
        ("png_cut_in_ihdr", GOOD_PNG[:20], "PNG cut inside its IHDR chunk", "decode"),
        ("png_cut_after_ihdr", GOOD_PNG[:33], "PNG cut right after IHDR (no IDAT)", "decode"),
        ("png_cut_in_idat", GOOD_PNG[:60], "PNG cut inside the compressed pixel data", "decode"),
        ("png_cut_end", GOOD_PNG[:-30], "PNG without the last 18 bytes of pixel data (and IEND)", "decode"),
        ("jpeg_soi_only", b"\xff\xd8", "JPEG start-of-image marker only", "decode"),
        ("jpeg_cut_in_header", jpeg[:100], "JPEG cut inside its tables", "decode"),
        ("jpeg_cut_in_scan", jpeg[: len(jpeg) - 40], "JPEG cut inside the entropy-coded scan", "decode"),
        ("gif_header_only", b"GIF89a", "GIF signature only", "decode"),
        ("gif_cut_after_screen", gif[:13], "GIF signature and logical screen, no frame", "decode"),
        ("bmp_cut_pixels", _bmp(16, 16, bytes(100)), "BMP whose pixel data stops after 100 of 768 bytes", "decode"),
        ("tiff_header_only", b"II*\0\x08\0\0\0", "TIFF header pointing at a missing directory", "decode"),
        ("webp_cut", webp[:30], "WebP cut inside its VP8L header", "decode"),
        # corrupt
        ("png_bad_ihdr_crc", GOOD_PNG[:29] + b"\0\0\0\0" + GOOD_PNG[33:], "PNG whose IHDR checksum is wrong", "decode"),
        ("png_zero_width", png(0, 16, idat=zlib.compress(b"")), "PNG with width 0", "decode"),
        ("png_bad_color_depth", png(16, 16, ihdr=struct.pack(">IIBBBBB", 16, 16, 7, 2, 0, 0, 0)), "PNG with bit depth 7", "decode"),
        ("png_corrupt_zlib", png(16, 16, idat=b"\x78\x9c" + bytes(range(64))), "PNG whose IDAT is not a zlib stream", "decode"),
        ("png_idat_length_short", GOOD_PNG[:33] + struct.pack(">I", 5) + GOOD_PNG[37:], "PNG whose IDAT length is 5 (chunks misaligned)", "decode"),
        ("jpeg_zero_size", _patch_jpeg_sof(jpeg, 0, 0), "JPEG whose frame header says 0x0 pixels", "decode"),
        ("jpeg_garbage_after_soi", b"\xff\xd8" + bytes(rng.randrange(256) for _ in range(512)), "JPEG marker then random bytes", "decode"),
        ("ico_garbage", b"\0\0\1\0\1\0\0\0\0\0\1\0\x20\0" + struct.pack("<II", 1000, 22) + b"junk", "ICO (not an accepted format)", "decode"),
        ("eps_infinite_loop", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n{} loop\n", "EPS that would loop forever in Ghostscript", "decode"),
        ("dds_header", b"DDS |" + bytes(123), "DDS header (not an accepted format)", "decode"),
        ("svg_text", b'<svg xmlns="http://www.w3.org/2000/svg" width="9999999" height="9999999"/>', "SVG (text, never decoded)", "decode"),
        ("pdf_header", b"%PDF-1.4\n1 0 obj<<>>endobj\n%%EOF\n", "PDF file", "decode"),
        ("zip_header", b"PK\x03\x04" + bytes(26) + b"x.png", "ZIP archive", "decode"),
        # polyglots: another format first, an image later
        ("polyglot_zip_then_png", b"PK\x03\x04" + bytes(26) + GOOD_PNG, "ZIP header, then a whole PNG", "decode"),
        ("polyglot_html_then_png", b"<html><script>alert(1)</script>" + GOOD_PNG, "HTML with a PNG appended", "decode"),
        ("polyglot_png_sig_jpeg_body", PNG_SIG + jpeg[2:], "PNG signature over a JPEG body", "decode"),
        ("polyglot_jpeg_soi_png_body", b"\xff\xd8" + GOOD_PNG[8:], "JPEG marker over a PNG body", "decode"),
        ("polyglot_gif_js", b"GIF89a/*\x00\x00\x00\x00*/=1;alert(1)//", "GIF/JavaScript polyglot with no frame", "decode"),
        ("polyglot_pdf_jpeg", b"%PDF-1.4\n" + jpeg, "PDF header with a JPEG inside", "decode"),
        # decompression bombs (refused from the header, before pixels are decoded)
        ("bomb_png_4100x4100", png(4100, 4100, color=0, pixels=bomb_rows), "16.8 Mpx PNG (just over the limit) in 16 KB", "pixels"),
        ("bomb_png_65535_header", _header65k(), "PNG claiming 65535x65535 with 64 bytes of data", "pixels"),
        ("bomb_png_rgba16_30000", png(30000, 30000, color=6, depth=16, idat=zlib.compress(b"\0" * 64)), "PNG claiming 30000^2 RGBA16 (7 GB)", "pixels"),
        ("bomb_png_1x2g", png(1, 0x7FFFFFFF, color=0, idat=zlib.compress(b"\0" * 64)), "PNG 1 x 2^31-1", "pixels"),
        ("bomb_png_ztxt", png(16, 16, before_idat=(_chunk(b"zTXt", b"Comment\0\0" + text_bomb),)), "1x PNG with an 8 MiB zTXt comment in 8 KB", "decode"),
        ("bomb_png_itxt", png(16, 16, before_idat=(_chunk(b"iTXt", b"Comment\0\1\0\0\0" + text_bomb),)), "PNG with an 8 MiB compressed iTXt", "decode"),
        ("bomb_png_iccp", png(16, 16, before_idat=(_chunk(b"iCCP", b"icc\0\0" + text_bomb),)), "PNG with an 8 MiB ICC profile in 8 KB", "decode"),
        ("bomb_jpeg_65500", _patch_jpeg_sof(jpeg, 65500, 65500), "JPEG whose frame header says 65500x65500", "pixels"),
        ("bomb_gif_65535", bytes(gif_huge), "GIF with a 65535x65535 logical screen", "pixels"),
        ("bomb_bmp_100k", _bmp(100000, 100000), "BMP header claiming 100000x100000", "pixels"),
        ("bomb_tiff_100k", _tiff(100000, 100000), "TIFF claiming 100000x100000, no strips", "pixels"),
        ("bomb_webp_16k", bytes(webp_huge), "WebP whose VP8L header says 16384x16384", "pixels"),
        # noise
        ("random_1k_a", bytes(rng.randrange(256) for _ in range(1024)), "1 KiB of random bytes", "decode"),
        ("random_1k_b", bytes(rng.randrange(256) for _ in range(1024)), "1 KiB of random bytes", "decode"),
        ("zeros_1k", bytes(1024), "1 KiB of zeros", "decode"),
        ("ff_1k", b"\xff" * 1024, "1 KiB of 0xFF", "decode"),
        ("one_byte", b"\x89", "one byte", "decode"),
        ("plain_text", b"hello, this is not a png", "ASCII text", "decode"),
    ]
    # fmt: on
    out = []
    for name, data, what, kind in cases:
        ext = (
            name.split("_")[0]
            if name.split("_")[0] in ("png", "jpeg", "gif", "bmp", "tiff", "webp", "ico", "eps", "svg", "pdf", "zip")
            else "bin"
        )
        match = r"pixels" if kind == "pixels" else r"cannot decode image|pixels, more than the limit"
        out.append({"name": name, "file": f"{name}.{ext}", "what": what, "data": data, "error": "ImageError", "match": match,
                    "codes": {"edge": "bad_image", "http": "bad_image", "worker": "bad_input"}})  # fmt: skip
    return out


# -- edge requests (MQTT JSON or raw image + user properties) ------------------------------------


def _j(doc: dict) -> bytes:
    return json.dumps(doc).encode("utf-8")


def _q(**extra) -> dict:
    return {"question": Q, "image": GOOD_B64, **extra}


def _sub(doc: dict, key: str, raw: str) -> bytes:
    """JSON text of ``doc`` with the value of ``key`` replaced by raw JSON text (NaN, Infinity, huge numbers)."""
    return _j({**doc, key: "@@RAW@@"}).replace(b'"@@RAW@@"', raw.encode("utf-8"))


def edge_request_cases() -> list[dict[str, Any]]:
    good = _j(_q())
    B, I, D, TL = "bad_request", "bad_image", "deadline", "too_large"  # noqa: E741, N806
    P = (("question", Q),)  # noqa: N806
    # fmt: off
    c: list[tuple] = [
        # malformed JSON
        ("mj_open_brace", b"{", (), B, "not JSON", "a lone {"),
        ("mj_truncated", b'{"question": "what color?", "image": ', (), B, "not JSON", "JSON cut after a key"),
        ("mj_trailing_comma", b'{"question": "q?", "image": "AAAA",}', (), B, "not JSON", "trailing comma"),
        ("mj_single_quotes", b"{'question': 'q?', 'image': 'AAAA'}", (), B, "not JSON", "Python-style single quotes"),
        ("mj_unquoted_key", b'{question: "q?"}', (), B, "not JSON", "unquoted key"),
        ("mj_missing_comma", b'{"question": "q?" "image": "AAAA"}', (), B, "not JSON", "missing comma"),
        ("mj_extra_brace", good + b"}", (), B, "not JSON", "one } too many"),
        ("mj_trailing_garbage", good + b" trailing", (), B, "not JSON", "text after the object"),
        ("mj_two_objects", good + good, (), B, "not JSON", "two objects in one message"),
        ("mj_raw_control_char", b'{"question": "what\x01color?", "image": "AAAA"}', (), B, "not JSON", "raw control character in a string"),
        ("mj_raw_newline", b'{"question": "what\ncolor?", "image": "AAAA"}', (), B, "not JSON", "raw newline in a string"),
        ("mj_bad_escape", b'{"question": "\\x41", "image": "AAAA"}', (), B, "not JSON", "\\x escape (not JSON)"),
        ("mj_short_unicode_escape", b'{"question": "\\u12", "image": "AAAA"}', (), B, "not JSON", "\\u escape with 2 digits"),
        ("mj_unterminated_string", b'{"question": "what color?', (), B, "not JSON", "string never closed"),
        ("mj_comment", b'{/* c */ "question": "q?"}', (), B, "not JSON", "C comment"),
        ("mj_nul_after", good + b"\x00", (), B, "not JSON", "NUL after the object"),
        ("mj_brace_then_garbage", b"  \n\t{ nope", (), B, "not JSON", "whitespace, {, garbage"),
        ("mj_huge_int", _sub(_q(), "deadline_ms", "9" * 5000), (), B, "not JSON", "5000-digit integer (over Python's int digit limit)"),
        ("mj_huge_int_4301", _sub(_q(), "split_layer", "1" * 4301), (), B, "not JSON", "4301-digit integer"),
        ("mj_python_none", _sub(_q(), "keep_ratio", "None"), (), B, "not JSON", "Python None"),
        ("mj_hex_number", _sub(_q(), "deadline_ms", "0x10"), (), B, "not JSON", "hex number"),
        ("mj_plus_number", _sub(_q(), "deadline_ms", "+5"), (), B, "not JSON", "number with a + sign"),
        ("mj_leading_zero", _sub(_q(), "deadline_ms", "05"), (), B, "not JSON", "number with a leading zero"),
        ("mj_dot_number", _sub(_q(), "deadline_ms", ".5"), (), B, "not JSON", "number starting with ."),
        ("mj_utf16", json.dumps(_q()).encode("utf-16-le"), (), B, "not JSON", "JSON in UTF-16-LE (starts with '{', NULs between)"),
        # wrong types and values
        ("wt_question_int", _j(_q(question=5)), (), B, "question", "question is a number"),
        ("wt_question_null", _j(_q(question=None)), (), B, "question", "question is null"),
        ("wt_question_list", _j(_q(question=["q?"])), (), B, "question", "question is a list"),
        ("wt_question_object", _j(_q(question={"text": "q?"})), (), B, "question", "question is an object"),
        ("wt_question_bool", _j(_q(question=True)), (), B, "question", "question is true"),
        ("wt_question_empty", _j(_q(question="")), (), B, "question", "empty question"),
        ("wt_question_blank", _j(_q(question=" \t\n ")), (), B, "question", "whitespace question"),
        ("wt_question_too_long", _j(_q(question="q" * 1001)), (), B, "over the limit of 1000", "1001-character question"),
        ("wt_question_lone_surrogate", _sub(_q(), "question", '"what \\ud800 color?"'), (), B, "surrogate", "question with an unpaired \\ud800 escape"),
        ("wt_question_placeholder", _j(_q(question="what is <image>?")), (), B, "placeholder", "question holding the prompt's image placeholder", "serve"),
        ("wt_image_int", _j(_q(image=5)), (), I, "image is missing", "image is a number"),
        ("wt_image_null", _j(_q(image=None)), (), I, "image is missing", "image is null"),
        ("wt_image_list", _j(_q(image=[GOOD_B64])), (), I, "image is missing", "image is a list"),
        ("wt_image_object", _j(_q(image={"data": GOOD_B64})), (), I, "image is missing", "image is an object"),
        ("wt_image_bool", _j(_q(image=True)), (), I, "image is missing", "image is true"),
        ("wt_image_empty", _j(_q(image="")), (), I, "image is missing", "empty image string"),
        ("wt_no_image", _j({"question": Q}), (), I, "image is missing", "no image key"),
        ("wt_no_question", _j({"image": GOOD_B64}), (), B, "question", "no question key"),
        ("wt_empty_object", b"{}", (), I, "image is missing", "empty object"),
        ("wt_stream_int", _j(_q(stream=5)), (), B, "stream must be a string", "stream is a number"),
        ("wt_stream_list", _j(_q(stream=["cam"])), (), B, "stream must be a string", "stream is a list"),
        ("wt_stream_space", _j(_q(stream="cam 1")), (), B, "stream id", "stream id with a space"),
        ("wt_stream_slash", _j(_q(stream="cam/1")), (), B, "stream id", "stream id with a topic separator"),
        ("wt_stream_too_long", _j(_q(stream="s" * 65)), (), B, "stream id", "65-character stream id"),
        ("wt_deadline_string", _j(_q(deadline_ms="5000")), (), B, "deadline_ms must be a number", "deadline as a string"),
        ("wt_deadline_bool", _j(_q(deadline_ms=True)), (), B, "deadline_ms must be a number", "deadline true"),
        ("wt_deadline_list", _j(_q(deadline_ms=[5000])), (), B, "deadline_ms must be a number", "deadline as a list"),
        ("wt_deadline_zero", _j(_q(deadline_ms=0)), (), D, "deadline", "deadline 0"),
        ("wt_deadline_negative", _j(_q(deadline_ms=-1)), (), D, "deadline", "deadline -1"),
        ("wt_deadline_over_cap", _j(_q(deadline_ms=600001)), (), D, "deadline", "deadline over the 600 s cap"),
        ("wt_deadline_infinity", _sub(_q(), "deadline_ms", "Infinity"), (), D, "deadline", "deadline Infinity (Python's JSON extension)"),
        ("wt_deadline_nan", _sub(_q(), "deadline_ms", "NaN"), (), D, "deadline", "deadline NaN"),
        ("wt_deadline_1e400", _sub(_q(), "deadline_ms", "1e400"), (), D, "deadline", "deadline 1e400 (parses as inf)"),
        ("wt_policy_int", _j(_q(policy=5)), (), B, "policy", "policy is a number"),
        ("wt_policy_unknown", _j(_q(policy="fastest")), (), B, "policy", "unknown policy"),
        ("wt_policy_list", _j(_q(policy=["msao"])), (), B, "policy", "policy is a list"),
        ("wt_policy_empty", _j(_q(policy="")), (), B, "policy", "empty policy"),
        ("wt_split_layer_string", _j(_q(split_layer="1")), (), B, "split_layer", "split_layer as a string"),
        ("wt_split_layer_float", _j(_q(split_layer=1.5)), (), B, "split_layer", "split_layer 1.5"),
        ("wt_split_layer_negative", _j(_q(split_layer=-1)), (), B, "split_layer", "split_layer -1"),
        ("wt_split_layer_bool", _j(_q(split_layer=True)), (), B, "split_layer", "split_layer true"),
        ("wt_keep_ratio_zero", _j(_q(keep_ratio=0)), (), B, "keep_ratio", "keep_ratio 0"),
        ("wt_keep_ratio_over_one", _j(_q(keep_ratio=1.5)), (), B, "keep_ratio", "keep_ratio 1.5"),
        ("wt_keep_ratio_string", _j(_q(keep_ratio="0.5")), (), B, "keep_ratio", "keep_ratio as a string"),
        ("wt_keep_ratio_bool", _j(_q(keep_ratio=True)), (), B, "keep_ratio", "keep_ratio true"),
        ("wt_keep_ratio_nan", _sub(_q(), "keep_ratio", "NaN"), (), B, "keep_ratio", "keep_ratio NaN"),
        ("wt_partials_string", _j(_q(partials="yes")), (), B, "partials", "partials as a string"),
        ("wt_partials_int", _j(_q(partials=1)), (), B, "partials", "partials as a number"),
        ("wt_request_id_list", _j(_q(request_id=[1])), (), B, "request id", "request_id is a list"),
        # (unknown keys are ignored, not refused: tests/edge_runtime/test_requests.py has those accepted cases)
        # context: any JSON, echoed back, but bounded
        ("ctx_too_large", _j(_q(context={"blob": "x" * 4096})), (), B, "context is 4107 bytes", "a context over 4096 bytes as JSON"),
        ("ctx_nan", _sub(_q(), "context", '{"x": NaN}'), (), B, "NaN or Infinity", "a context holding NaN"),
        ("ctx_too_deep", _j(_q(context={"a": {"b": {"c": 1}}})), (), B, "nested deeper than 4", "a context 4 levels deep (5 with the request)"),
        # request ids: wildcards, separators, traversal, control characters
        *[(f"id_{n}", _j(_q(request_id=v)), (), B, "request id", f"request_id {v!r}") for n, v in (
            ("space", "no spaces"), ("plus", "a+b"), ("hash", "a#b"), ("slash", "a/b"), ("dotdot", ".."), ("traversal", "../../etc/passwd"),
            ("dollar", "$SYS"), ("too_long", "r" * 65), ("trailing_newline", "req1\n"), ("nul", "req\u0000"), ("accent", "r\u00e9q"),
            ("fullwidth", "\uff52\uff45\uff51"), ("percent", "a%2Fb"),
        )],
        # nesting and size
        ("nest_depth5_stream", _j(_q(stream={"a": {"b": {"c": {}}}})), (), B, "nested deeper than 4", "5 levels of objects"),
        ("nest_depth6_question", _j(_q(question=[[[[["q?"]]]]])), (), B, "nested deeper than 4", "question in 5 nested lists"),
        ("nest_recursion_lists", b'{"a": ' + b"[" * 20000, (), B, "not JSON", "20000 nested lists (recursion limit)"),
        ("nest_recursion_objects", b'{"a":' * 5000, (), B, "not JSON", "5000 nested objects"),
        ("wide_many_keys", _j({f"k{i}": 0 for i in range(3000)}), (), I, "image is missing", "3000 unknown keys (ignored) and no image"),
        ("wide_big_array", _j(_q(stream=[0] * 20000)), (), B, "stream must be a string", "stream is a 20000-item list"),
        ("oversize_json", _j(_q(image=GOOD_B64 + "A" * REQ_LIMIT)), (), TL, f"over the limit of {REQ_LIMIT}", "JSON just over the payload limit"),
        ("oversize_question", _j(_q(question="q" * 60000)), (), B, "over the limit of 1000", "60000-character question (under the payload limit)"),
        # base64 garbage
        *[(f"b64_{n}", _j(_q(image=v)), (), I, m, f"image {w}") for n, v, m, w in (
            ("stars", "***not base64***", "base64", "is not base64"), ("single_char", "A", "base64", "is one base64 character"),
            ("padding_middle", "AA==AA==", "base64", "has padding in the middle"), ("space_inside", "iVBO Rw0K", "base64", "has a space inside"),
            ("newline_inside", "iVBO\nRw0K", "base64", "has a newline inside"), ("non_ascii", "\u00c4\u00d6\u00dc", "base64", "is non-ASCII text"),
            ("emoji", "\U0001f600\U0001f600", "base64", "is emoji"), ("only_padding", "====", "base64|empty", "is only padding"),
            ("data_uri_no_comma", "data:image/png;base64", "data URI", "is a data URI without a comma"),
            ("data_uri_not_base64", "data:image/png,iVBOR", "data URI", "is a data URI without ;base64"),
            ("data_uri_garbage", "data:image/png;base64,!!!!", "base64", "is a data URI with garbage"),
            ("data_uri_empty", "data:image/png;base64,", "empty", "is an empty data URI"), ("nul", "\u0000AAA", "base64", "starts with NUL"),
            ("percent_encoded", "iVBOR%3D%3D", "base64", "is percent-encoded"), ("html", "<img src=x onerror=alert(1)>", "base64", "is HTML"),
            ("big_garbage", "!" * 50000, "base64", "is 50000 '!'"),
        )],
        *[(f"b64_decodes_to_{n}", _j(_q(image=base64.b64encode(v).decode())), (), I, m, f"valid base64 of {w}", "decode") for n, v, m, w in (
            ("text", b"hello, not a png", "cannot decode image", "text"), ("truncated_png", GOOD_PNG[:40], "cannot decode image", "a cut PNG"),
            ("gif_header", b"GIF89a", "cannot decode image", "a GIF signature"), ("zip", b"PK\x03\x04" + bytes(40), "cannot decode image", "a ZIP header"),
            ("png_bomb", _header65k(), "pixels", "a 65535x65535 PNG header"),
        )],
        ("b64_urlsafe_decodes_to_garbage", _j(_q(image="-_-_-_-_")), (), I, "cannot decode image", "URL-safe base64 of 6 garbage bytes", "decode"),
        # not UTF-8
        ("nu_ff", b'{"question": "what \xff color?", "image": "AAAA"}', (), B, "UTF-8", "0xFF byte in a string"),
        ("nu_latin1", '{"question": "caf\u00e9?", "image": "AAAA"}'.encode("latin-1"), (), B, "UTF-8", "Latin-1 text"),
        ("nu_lone_continuation", b'{"question": "\x80", "image": "AAAA"}', (), B, "UTF-8", "lone continuation byte"),
        ("nu_overlong_slash", b'{"question": "\xc0\xaf", "image": "AAAA"}', (), B, "UTF-8", "overlong encoding of /"),
        ("nu_encoded_surrogate", b'{"question": "\xed\xa0\x80", "image": "AAAA"}', (), B, "UTF-8", "UTF-8-encoded surrogate"),
        ("nu_cut_multibyte", good[:-2] + b"\xe2\x82", (), B, "UTF-8", "JSON ending in half a character"),
        ("nu_five_byte", b'{"question": "\xf8\x88\x80\x80\x80", "image": "AAAA"}', (), B, "UTF-8", "5-byte sequence"),
        ("nu_above_max", b'{"question": "\xf4\x90\x80\x80", "image": "AAAA"}', (), B, "UTF-8", "code point above U+10FFFF"),
        ("nu_cp1252_quotes", b'{"question": "\x93what\x94", "image": "AAAA"}', (), B, "UTF-8", "Windows-1252 quotes"),
        ("nu_in_key", b'{"qu\xe9stion": "q?", "image": "AAAA"}', (), B, "UTF-8", "Latin-1 byte in a key"),
        # raw image + user properties
        ("raw_no_question", GOOD_PNG, (), B, "question", "raw PNG without a question property"),
        ("raw_typo_property", GOOD_PNG, (("qustion", Q),), B, "question is missing", "misspelt question property (ignored, so no question)"),
        ("raw_empty_question", GOOD_PNG, (("question", ""),), B, "question", "empty question property"),
        ("raw_blank_question", GOOD_PNG, (("question", "   "),), B, "question", "blank question property"),
        ("raw_question_too_long", GOOD_PNG, (("question", "q" * 1001),), B, "over the limit of 1000", "1001-character question property"),
        ("raw_question_placeholder", GOOD_PNG, (("question", "<image>?"),), B, "placeholder", "question property with the image placeholder", "serve"),
        *[(f"raw_deadline_{n}", GOOD_PNG, (*P, ("deadline_ms", v)), code, m, f"deadline_ms property {v!r}") for n, v, code, m in (
            ("not_number", "soon", B, "not a number"), ("hex", "0x10", B, "not a number"), ("empty", "", B, "not a number"),
            ("nan", "NaN", D, "deadline"), ("inf", "inf", D, "deadline"), ("zero", "0", D, "deadline"), ("negative", "-5", D, "deadline"),
            ("overflow", "1e309", D, "deadline"),
        )],
        ("raw_request_id_space", GOOD_PNG, (*P, ("request_id", "bad id")), B, "request id", "request_id property with a space"),
        ("raw_request_id_traversal", GOOD_PNG, (*P, ("request_id", "../x")), B, "request id", "request_id property '../x'"),
        ("raw_request_id_wildcards", GOOD_PNG, (*P, ("request_id", "a+#")), B, "request id", "request_id property with + and #"),
        ("raw_stream_slash", GOOD_PNG, (*P, ("stream", "cam/1")), B, "stream id", "stream property with a /"),
        ("raw_policy_unknown", GOOD_PNG, (*P, ("policy", "bogus")), B, "policy", "unknown policy property"),
        ("raw_split_layer_property", GOOD_PNG, (*P, ("split_layer", "1")), B, "only in the JSON form", "split_layer (JSON-only) as a property"),
        ("raw_context_property", GOOD_PNG, (*P, ("context", "{}")), B, "only in the JSON form", "context (JSON-only) as a property"),
        ("raw_partials_property", GOOD_PNG, (*P, ("partials", "true")), B, "only in the JSON form", "partials (JSON-only) as a property"),
        ("raw_empty_payload", b"", P, B, "image is empty", "empty payload with a question"),
        ("raw_oversize", GOOD_PNG + bytes(REQ_LIMIT), P, TL, f"over the limit of {REQ_LIMIT}", "raw payload just over the limit"),
        ("raw_bom_json", b"\xef\xbb\xbf" + good, (), B, "question", "JSON after a UTF-8 BOM (read as a raw image)"),
        ("raw_array_json", b'[{"question": "q?"}]', (), B, "question", "JSON array (read as a raw image)"),
        ("raw_not_an_image", b"hello, not an image", P, I, "cannot decode image", "text payload with a question", "decode"),
        ("raw_zeros", bytes(1024), P, I, "cannot decode image", "1 KiB of zeros with a question", "decode"),
    ]
    # fmt: on
    out = []
    for name, data, props, code, match, what, *stage in c:
        stage = stage[0] if stage else "parse"
        error = {"parse": "RequestError", "decode": "ImageError", "serve": "FeedError"}[stage]
        ext = "json" if data.lstrip()[:1] == b"{" else "bin"
        out.append({"name": name, "file": f"{name}.{ext}", "what": what, "data": data, "properties": [list(p) for p in props],
                    "stage": stage, "error": error, "code": code, "match": match})  # fmt: skip
    return out


# -- HTTP chat-completion bodies ---------------------------------------------------------------


def _chat(question: Any = Q, url: Any = "data:image/png;base64," + GOOD_B64, *, content: Any = None, msao: Any = None, **extra) -> dict:
    parts = content if content is not None else [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": url}}]
    doc: dict[str, Any] = {"model": "msao", "messages": [{"role": "user", "content": parts}], **extra}
    if msao is not None:
        doc["msao"] = msao
    return doc


def http_chat_cases() -> list[dict[str, Any]]:
    B, I, TL = "bad_request", "bad_image", "too_large"  # noqa: E741, N806
    text = {"type": "text", "text": Q}
    img = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + GOOD_B64}}
    deep: Any = 1
    for _ in range(10):
        deep = {"a": deep}
    # fmt: off
    c: list[tuple] = [
        ("not_utf8_ff", b'{"model": "msao", "messages": "\xff"}', B, "UTF-8", "0xFF byte"),
        ("not_utf8_latin1", '{"model": "caf\u00e9"}'.encode("latin-1"), B, "UTF-8", "Latin-1 body"),
        ("not_json_brace", b"{", B, "not JSON", "a lone {"),
        ("not_json_empty", b"", B, "not JSON", "empty body"),
        ("not_json_trailing", _j(_chat()) + b"x", B, "not JSON", "text after the object"),
        ("not_json_huge_int", b'{"messages": ' + b"9" * 5000 + b"}", B, "not JSON", "5000-digit integer"),
        ("not_json_recursion", b"[" * 20000, B, "not JSON", "20000 nested lists"),
        ("top_array", b"[]", B, "must be a JSON object", "a JSON array"),
        ("top_string", b'"hello"', B, "must be a JSON object", "a JSON string"),
        ("top_number", b"1", B, "must be a JSON object", "a JSON number"),
        ("top_null", b"null", B, "must be a JSON object", "JSON null"),
        ("deep_11_levels", _j({**_chat(), "x": deep}), B, "nested deeper than 10", "11 levels of objects"),
        ("many_items", _j(_chat(extra_list=[0] * 1001)), B, "more than 1000 values", "1001-item list"),
        ("stream_string", _j(_chat(stream="yes")), B, "'stream' must be true or false", 'stream: "yes"'),
        ("stream_options_list", _j(_chat(stream=True, stream_options=[1])), B, "'stream_options' must be", "stream_options is a list"),
        ("n_two", _j(_chat(n=2)), B, "one .greedy. answer", "n: 2"),
        ("max_tokens_zero", _j(_chat(max_tokens=0)), B, "max_tokens must be a positive integer", "max_tokens: 0"),
        ("max_tokens_string", _j(_chat(max_tokens="8")), B, "max_tokens must be a positive integer", "max_tokens as a string"),
        ("max_tokens_disagree", _j(_chat(max_tokens=4, max_completion_tokens=8)), B, "disagree", "two different budgets"),
        ("stop_number", _j(_chat(stop=5)), B, "'stop' must be", "stop is a number"),
        ("stop_five", _j(_chat(stop=["a", "b", "c", "d", "e"])), B, "'stop' must be", "five stop strings"),
        ("msao_list", _j(_chat(msao=[1])), B, "'msao' must be an object", "msao is a list"),
        ("msao_string", _j(_chat(msao="x")), B, "'msao' must be an object", "msao is a string"),
        ("msao_unknown_key", _j(_chat(msao={"colour": 1})), B, "unknown 'msao' keys", "unknown msao key"),
        ("deadline_string", _j(_chat(msao={"deadline_ms": "5000"})), B, "deadline_ms must be a number", "deadline as a string"),
        ("deadline_zero", _j(_chat(msao={"deadline_ms": 0})), B, "deadline_ms must be a number", "deadline 0"),
        ("deadline_negative", _j(_chat(msao={"deadline_ms": -1})), B, "deadline_ms must be a number", "deadline -1"),
        ("deadline_bool", _j(_chat(msao={"deadline_ms": True})), B, "deadline_ms must be a number", "deadline true"),
        ("deadline_nan", _j(_chat(msao={"deadline_ms": "@"})).replace(b'"@"', b"NaN"), B, "deadline_ms must be a number", "deadline NaN"),
        ("deadline_over_cap", _j(_chat(msao={"deadline_ms": 600001})), B, "deadline_ms must be a number", "deadline over the cap"),
        ("stream_id_int", _j(_chat(msao={"stream": 5})), B, "wrong type", "msao.stream is a number"),
        ("policy_int", _j(_chat(msao={"policy": 5})), B, "wrong type", "msao.policy is a number"),
        ("request_id_int", _j(_chat(msao={"request_id": 5})), B, "wrong type", "msao.request_id is a number"),
        ("split_layer_float", _j(_chat(msao={"split_layer": 1.5})), B, "wrong type", "msao.split_layer 1.5"),
        ("keep_ratio_string", _j(_chat(msao={"keep_ratio": "0.5"})), B, "wrong type", "msao.keep_ratio as a string"),
        ("keep_ratio_bool", _j(_chat(msao={"keep_ratio": True})), B, "wrong type", "msao.keep_ratio true"),
        ("policy_unknown", _j(_chat(msao={"policy": "fastest"})), B, "policy", "unknown policy"),
        ("request_id_newline", _j(_chat(msao={"request_id": "r1\n"})), B, "request id", "request id with a trailing newline"),
        ("request_id_wildcards", _j(_chat(msao={"request_id": "a/+/#"})), B, "request id", "request id with wildcards"),
        ("keep_ratio_two", _j(_chat(msao={"keep_ratio": 2})), B, "keep_ratio", "keep_ratio 2"),
        ("question_surrogate", _j(_chat(question="@")).replace(b'"@"', b'"what \\udc00?"'), B, "surrogate", "text with an unpaired \\udc00"),
        ("question_placeholder", _j(_chat(question="what is <image>?")), B, "placeholder", "text with the image placeholder", "serve"),
        ("messages_missing", _j({"model": "msao"}), B, "'messages' must be a non-empty list", "no messages"),
        ("messages_object", _j({"model": "msao", "messages": {}}), B, "'messages' must be a non-empty list", "messages is an object"),
        ("messages_empty", _j({"model": "msao", "messages": []}), B, "'messages' must be a non-empty list", "messages is empty"),
        ("messages_string", _j({"model": "msao", "messages": "hi"}), B, "'messages' must be a non-empty list", "messages is a string"),
        ("no_user", _j({"messages": [{"role": "system", "content": "x"}]}), B, "no message has role 'user'", "system message only"),
        ("messages_not_objects", _j({"messages": [1, 2]}), B, "no message has role 'user'", "messages are numbers"),
        ("content_number", _j({"messages": [{"role": "user", "content": 5}]}), B, "content must be", "content is a number"),
        ("content_object", _j({"messages": [{"role": "user", "content": {}}]}), B, "content must be", "content is an object"),
        ("part_audio", _j(_chat(content=[text, {"type": "input_audio"}])), B, "content part type", "an audio part"),
        ("part_not_object", _j(_chat(content=[1, img])), B, "content part type", "a part that is a number"),
        ("part_text_not_string", _j(_chat(content=[{"type": "text", "text": 5}, img])), B, "content part type", "text part holding a number"),
        ("image_url_number", _j(_chat(content=[text, {"type": "image_url", "image_url": 5}])), I, "image_url must be", "image_url is a number"),
        ("image_url_empty_object", _j(_chat(content=[text, {"type": "image_url", "image_url": {}}])), I, "image_url must be", "image_url {}"),
        ("two_images", _j(_chat(content=[text, img, img])), I, "2 images", "two images"),
        ("http_url", _j(_chat(url="http://example.com/x.png")), I, "never fetches", "http URL"),
        ("file_url", _j(_chat(url="file:///etc/passwd")), I, "never fetches", "file URL"),
        ("data_uri_not_base64", _j(_chat(url="data:image/png,abc")), I, "data URI", "data URI without ;base64"),
        ("data_uri_garbage", _j(_chat(url="data:image/png;base64,!!!")), I, "base64", "data URI with garbage"),
        ("data_uri_empty", _j(_chat(url="data:image/png;base64,")), I, "empty", "empty data URI"),
        ("no_text", _j(_chat(content=[img])), B, "no question", "image only"),
        ("blank_text", _j(_chat(question="   ")), B, "no question", "whitespace text"),
        ("question_too_long", _j(_chat(question="q" * 1001)), B, "over the limit of 1000", "1001-character text"),
        ("image_too_large", _j(_chat(url="data:image/png;base64," + base64.b64encode(GOOD_PNG + bytes(REQ_LIMIT)).decode())), TL,
         f"over the limit of {REQ_LIMIT}", "image just over the payload limit"),
        ("decodes_to_text", _j(_chat(url="data:image/png;base64," + base64.b64encode(b"hello").decode())), I, "cannot decode image",
         "data URI of text", "decode"),
        ("decodes_to_png_bomb", _j(_chat(url="data:image/png;base64," + base64.b64encode(_header65k()).decode())), I,
         "pixels", "data URI of a 65535x65535 PNG header", "decode"),
    ]
    # fmt: on
    status = {"bad_request": 400, "bad_image": 400, "too_large": 413}
    out = []
    for name, data, code, match, what, *stage in c:
        stage = stage[0] if stage else "parse"
        error = {"parse": "RequestError", "decode": "ImageError", "serve": "FeedError"}[stage]
        out.append({"name": name, "file": f"{name}.json", "what": what, "data": data, "stage": stage, "error": error, "code": code,
                    "status": status[code], "match": match})  # fmt: skip
    return out


def http_raw_cases() -> list[dict[str, Any]]:
    """Whole HTTP requests (request line, headers, body) that the HTTP intake refuses."""
    P = b"POST /v1/chat/completions HTTP/1.0\r\n"  # noqa: N806
    body = _j(_chat())
    cl = b"Content-Length: %d\r\n" % len(body)
    # fmt: off
    c = [
        ("no_content_length", P + b"Content-Type: application/json\r\n\r\n", 411, "length_required", "Content-Length", "POST without Content-Length"),
        ("chunked_bad_chunk", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
         400, "bad_request", "", "a chunk size that is not hex"),
        ("chunked_empty_object", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
         400, "bad_request", "messages", "a chunked body read whole: {}"),
        ("length_not_number", P + b"Content-Length: abc\r\n\r\n", 400, "bad_request", "Content-Length", "Content-Length: abc"),
        ("length_negative", P + b"Content-Length: -1\r\n\r\n", 400, "bad_request", "Content-Length", "Content-Length: -1"),
        ("length_superscript", P + b"Content-Length: \xb2\r\n\r\n", 400, "bad_request", "Content-Length", "Content-Length: superscript two (Latin-1)"),
        ("length_twice", P + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}", 400, "bad_request", "Content-Length", "two different Content-Lengths"),
        ("length_huge", P + b"Content-Length: 99999999999\r\n\r\n", 413, "too_large", "over the limit", "Content-Length of 100 GB"),
        ("body_short", P + b"Content-Length: 100\r\n\r\n{}", 400, "bad_request", "body ended", "2 of 100 body bytes, then end of stream"),
        ("get_chat", b"GET /v1/chat/completions HTTP/1.0\r\n\r\n", 405, "method_not_allowed", "takes POST", "GET on the chat endpoint"),
        ("unknown_path", b"POST /v2/nope HTTP/1.0\r\n" + cl + b"\r\n" + body, 404, "not_found", "no such endpoint", "unknown path"),
        ("dotdot_path", b"POST /v1/../v1/chat/completions HTTP/1.0\r\n" + cl + b"\r\n" + body, 404, "not_found", "no such endpoint", "path with .."),
        ("encoded_slash_path", b"POST /v1/chat%2Fcompletions HTTP/1.0\r\n" + cl + b"\r\n" + body, 404, "not_found", "no such endpoint", "path with %2F"),
        ("tls_hello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400, "bad_request", "", "TLS ClientHello bytes on the HTTP port"),
        ("http09_post", b"POST /v1/chat/completions\r\n\r\n", 400, "bad_request", "", "HTTP/0.9 POST"),
        ("http2_version", b"POST /v1/chat/completions HTTP/2.0\r\n\r\n", 505, "internal", "", "HTTP/2.0 request line"),
        ("bad_version", b"POST /v1/chat/completions HTTP/1.x\r\n\r\n", 400, "bad_request", "", "HTTP/1.x"),
        ("header_too_long", P + b"X-Long: " + b"a" * 70000 + b"\r\n\r\n", 431, "bad_request", "", "one 70000-byte header line"),
        ("too_many_headers", P + b"".join(b"X-H%d: 1\r\n" % i for i in range(120)) + b"\r\n", 431, "bad_request", "", "120 headers"),
    ]
    # fmt: on
    return [
        {"name": n, "file": f"{n}.http", "what": w, "data": d, "status": s, "code": code, "match": m, "half_close": n == "body_short"}
        for n, d, s, code, m, w in c
    ]


# -- cloud jobs ---------------------------------------------------------------------------------


def _feeds(d: int = 128, t: int = 2) -> dict[str, np.ndarray]:
    return {
        "hidden_states": np.ones((1, t, d), np.float32),
        "position_ids": np.arange(t, dtype=np.int64)[None],
        "attention_mask": np.ones((1, t), np.int64),
    }


def _meta(job_id: str, **over) -> dict[str, str]:
    md = {"job_id": job_id, "model_hash": PLACEHOLDER_HASH, "kind": "split", "deadline_unix_s": repr(FAR_DEADLINE_UNIX_S),
          "segment": "decoder[3:4]", "layout": "1"}  # fmt: skip
    for k, v in over.items():
        if v is None:
            md.pop(k, None)
        else:
            md[k] = v
    return md


def _raw(header: Any, data: bytes = b"", hlen: int | None = None) -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(h) if hlen is None else hlen) + h + data


def _zstd_zeros(total: int, declare: bool) -> bytes:
    buf = io.BytesIO()
    with zstandard.ZstdCompressor(level=19).stream_writer(buf, size=total if declare else -1, closefd=False) as w:
        for _ in range(total >> 20):
            w.write(bytes(1 << 20))
    return buf.getvalue()


def _zstd_lying(body: bytes) -> bytes:
    """A frame whose header declares ``len(body)`` bytes but whose blocks hold 8 KiB more."""
    big = zstandard.ZstdCompressor(level=19, write_content_size=True).compress(body + bytes(8192))
    small = zstandard.ZstdCompressor(level=19, write_content_size=True).compress(body)
    return small[: zstandard.frame_header_size(small)] + big[zstandard.frame_header_size(big) :]


def _zstd_huge_header() -> bytes:
    # magic, frame header descriptor (FCS 8 bytes, single segment), 8-byte content size 2^40, then a raw empty last block
    return b"\x28\xb5\x2f\xfd" + bytes([0xE0]) + struct.pack("<Q", 1 << 40) + b"\x01\x00\x00"


def job_cases() -> list[dict[str, Any]]:
    """Job payloads for a worker: (stage, error class, worker error code / drop)."""
    rng = np.random.default_rng(7)
    BP, TL, BJ = "bad_payload", "too_large", "bad_job"  # noqa: N806
    U8 = {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}  # noqa: N806
    good_md = _meta("@")
    compressed_job = payload_from_tensors(_feeds(), good_md, compress=True)
    valid = payload_from_tensors(_feeds(), good_md)

    def job(md_over: dict | None = None, tensors: dict | None = None, **kw) -> Any:
        return lambda jid: payload_from_tensors(_feeds() if tensors is None else tensors, _meta(jid, **(md_over or {})), **kw)

    def ans(**over) -> dict:
        return {"kind": "answer", "segment": "", "question": Q, **over}

    def ver(**over) -> dict:
        return {"kind": "verify", "segment": "", "question": Q, "session_id": "corpus-speculation", **over}

    img = np.frombuffer(GOOD_PNG, np.uint8)
    # fmt: off
    c: list[tuple] = [
        # codec: safetensors framing and header
        ("c_empty", "codec", "CodecError", BP, "shorter than the 8-byte", b"", "empty payload"),
        ("c_seven_bytes", "codec", "CodecError", BP, "shorter than the 8-byte", b"\x07" * 7, "7 bytes"),
        ("c_hlen_past_payload", "codec", "CodecError", BP, "runs past the payload", _raw({}, hlen=5000), "header length 5000, 2 bytes follow"),
        ("c_hlen_over_limit", "codec", "PayloadTooLarge", TL, "over the limit", struct.pack("<Q", 1 << 40) + b"{}", "header length 2^40"),
        ("c_hlen_u64_max", "codec", "PayloadTooLarge", TL, "over the limit", b"\xff" * 8 + b"{}", "header length 2^64-1"),
        ("c_header_not_json", "codec", "CodecError", BP, "not valid JSON", _raw(b"{nope"), "header '{nope'"),
        ("c_header_not_utf8", "codec", "CodecError", BP, "not valid JSON", _raw(b"\xff\xfe{}"), "header in UTF-16 with BOM"),
        ("c_header_array", "codec", "CodecError", BP, "must be a JSON object", _raw([1, 2]), "header is an array"),
        ("c_header_string", "codec", "CodecError", BP, "must be a JSON object", _raw("x"), "header is a string"),
        ("c_header_huge_int", "codec", "CodecError", BP, "not valid JSON", _raw(b'{"a": ' + b"1" * 5000 + b"}"), "5000-digit integer in the header"),
        ("c_header_nan", "codec", "CodecError", BP, "not JSON", _raw(b'{"a": NaN}'), "NaN in the header"),
        ("c_header_infinity", "codec", "CodecError", BP, "not JSON", _raw(b'{"a": -Infinity}'), "-Infinity in the header"),
        ("c_header_duplicate_key", "codec", "CodecError", BP, "repeats the key", _raw(b'{"a": {}, "a": {}}'), "key 'a' twice"),
        ("c_header_deep", "codec", "CodecError", BP, "not valid JSON", _raw(b"[" * 5000), "5000 nested lists"),
        ("c_metadata_not_strings", "codec", "CodecError", BP, "strings to strings", _raw({"__metadata__": {"k": 1}}), "metadata value 1"),
        ("c_metadata_list", "codec", "CodecError", BP, "strings to strings", _raw({"__metadata__": ["k"]}), "metadata is a list"),
        *[(f"c_dtype_{n}", "codec", "CodecError", BP, "is not supported", _raw({"x": {**U8, "dtype": v}}, b"\0"), f"dtype {v!r}") for n, v in (
            ("bf16", "BF16"), ("lowercase", "u8"), ("list", ["U8"]), ("object", {"U8": 1}), ("int", 8), ("null", None), ("f8", "F8_E4M3"),
        )],
        *[(f"c_shape_{n}", "codec", "CodecError", BP, "shape must be", _raw({"x": {**U8, "shape": v}}, b"\0"), f"shape {v!r}") for n, v in (
            ("negative", [-1]), ("bool", [True]), ("float", [1.0]), ("string", "1"), ("rank9", [1] * 9), ("object", {"0": 1}),
            ("huge_dim", [1 << 62]),
        )],
        ("c_shape_huge_zero_size", "codec", "CodecError", BP, "too large for an array",
         _raw({"x": {"dtype": "U8", "shape": [0, 1 << 61, 1 << 61], "data_offsets": [0, 0]}}), "zero-size tensor whose other dims overflow"),
        *[(f"c_offsets_{n}", "codec", "CodecError", BP, "data_offsets must be", _raw({"x": {**U8, "data_offsets": v}}, b"\0"), f"data_offsets {v!r}")
          for n, v in (("reversed", [1, 0]), ("three", [0, 1, 1]), ("negative", [-1, 0]), ("float", [0, 1.0]), ("object", {"b": 0}))],
        ("c_entry_extra_key", "codec", "CodecError", BP, "exactly dtype", _raw({"x": {**U8, "x": 1}}, b"\0"), "entry with an extra key"),
        ("c_entry_missing_key", "codec", "CodecError", BP, "exactly dtype", _raw({"x": {"dtype": "U8", "shape": [1]}}, b"\0"), "entry without data_offsets"),
        ("c_entry_not_object", "codec", "CodecError", BP, "exactly dtype", _raw({"x": 5}, b"\0"), "entry is a number"),
        ("c_empty_name", "codec", "CodecError", BP, "empty name", _raw({"": U8}, b"\0"), "tensor named ''"),
        ("c_too_many_tensors", "codec", "PayloadTooLarge", TL, "over the limit 256",
         _raw({f"t{i}": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]} for i in range(300)}), "300 empty tensors"),
        # shape / byte mismatches
        ("m_shape_bytes", "codec", "CodecError", BP, "needs 1024 bytes, data_offsets give 12",
         _raw({"__metadata__": _meta("@"), "hidden_states": {"dtype": "F32", "shape": [1, 2, 128], "data_offsets": [0, 12]}}, bytes(12)),
         "hidden_states (1, 2, 128) F32 over 12 bytes"),
        ("m_past_data", "codec", "CodecError", BP, "past the data", _raw({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(8)), "16 bytes declared, 8 sent"),
        ("m_overlap", "codec", "CodecError", BP, "overlaps",
         _raw({"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}, "b": {"dtype": "U8", "shape": [2], "data_offsets": [1, 3]}}, bytes(3)),
         "two tensors sharing a byte"),
        ("m_hole", "codec", "CodecError", BP, "leaves a hole", _raw({"x": {**U8, "data_offsets": [1, 2]}}, bytes(2)), "data starts at byte 1"),
        ("m_trailing_bytes", "codec", "CodecError", BP, "cover 1", _raw({"x": U8}, bytes(5)), "4 bytes nobody owns"),
        ("m_bool_bytes", "codec", "CodecError", BP, "BOOL bytes must be 0 or 1", _raw({"x": {**U8, "dtype": "BOOL"}}, b"\x07"), "BOOL 7"),
        ("m_truncated_job", "codec", "CodecError", BP, "past the data|cover", lambda jid: job()(jid)[:-10], "valid split job cut by 10 bytes"),
        # zstd
        ("z_bomb_declared", "codec", "PayloadTooLarge", TL, "declares 16777216 bytes, over the limit", _zstd_zeros(16 << 20, True), "16 MiB of zeros, size declared"),
        ("z_bomb_undeclared", "codec", "CodecError", BP, "does not declare its content size", _zstd_zeros(16 << 20, False), "16 MiB of zeros, size not declared"),
        ("z_declares_2_40", "codec", "PayloadTooLarge", TL, "declares 1099511627776 bytes", _zstd_huge_header(), "frame header claiming 1 TiB"),
        ("z_lies_about_size", "codec", "CodecError", BP, "held more|corrupt", _zstd_lying(valid), "frame holding 8 KiB more than it declares"),
        ("z_magic_then_garbage", "codec", "CodecError", BP, "frame header is invalid|corrupt|content size", b"\x28\xb5\x2f\xfd\x00garbage", "zstd magic then garbage"),
        ("z_truncated", "codec", "CodecError", BP, "corrupt|held", compressed_job[:-7], "compressed job cut by 7 bytes"),
        ("z_flipped_byte", "codec", "CodecError", BP, "corrupt|held|not valid|past the data|needs|cover|hole|shorter",
         compressed_job[:40] + bytes([compressed_job[40] ^ 0xFF]) + compressed_job[41:], "compressed job with one byte flipped"),
        ("z_random_content", "codec", "PayloadTooLarge", TL, "over the limit",
         zstandard.ZstdCompressor(level=3, write_content_size=True).compress(rng.integers(0, 256, 4000, dtype=np.uint8).tobytes()),
         "valid frame of 4000 random bytes (a random header length)"),
        # oversize
        ("o_wire_over_limit", "codec", "PayloadTooLarge", TL, "over the limit", job(tensors={**_feeds(), "pad": np.zeros(JOB_MAX_PAYLOAD_BYTES, np.uint8)}), "job just over the payload limit"),
        # job header (payload metadata)
        ("h_no_metadata", "header", "CodecError", BJ, "layout None", payload_from_tensors(_feeds()), "tensors without metadata"),
        ("h_layout_2", "header", "CodecError", BJ, "layout '2'", job({"layout": "2"}), "layout 2"),
        ("h_no_layout", "header", "CodecError", BJ, "layout None", job({"layout": None}), "no layout"),
        ("h_unknown_key", "header", "CodecError", BJ, "unknown metadata keys", job({"priority": "9"}), "unknown key 'priority'"),
        ("h_missing_kind", "header", "CodecError", BJ, "kind", job({"kind": None}), "no kind"),
        ("h_missing_deadline", "header", "CodecError", BJ, "deadline_unix_s", job({"deadline_unix_s": None}), "no deadline"),
        ("h_kind_unknown", "header", "CodecError", BJ, "kind 'train'", job({"kind": "train"}), "kind 'train'"),
        ("h_deadline_nan", "header", "CodecError", BJ, "not a valid float", job({"deadline_unix_s": "nan"}), "deadline 'nan'"),
        ("h_deadline_text", "header", "CodecError", BJ, "not a valid float", job({"deadline_unix_s": "soon"}), "deadline 'soon'"),
        ("h_past_length_huge", "header", "CodecError", BJ, "not a valid int", job({"past_length": "9" * 5000}), "5000-digit past_length"),
        ("h_past_length_float", "header", "CodecError", BJ, "not a valid int", job({"past_length": "1.5"}), "past_length '1.5'"),
        ("h_past_without_session", "header", "CodecError", BJ, "needs a session_id", job({"past_length": "3"}), "past_length 3, no session"),
        ("h_segment_reversed", "header", "CodecError", BJ, "segment", job({"segment": "decoder[4:2]"}), "segment decoder[4:2]"),
        ("h_segment_newline", "header", "CodecError", BJ, "segment", job({"segment": "decoder[3:4]\n"}), "segment with a trailing newline"),
        ("h_segment_traversal", "header", "CodecError", BJ, "segment", job({"segment": "../decoder[3:4]"}), "segment '../decoder[3:4]'"),
        ("h_head_unknown", "header", "CodecError", BJ, "head 'softmax'", job({"head": "softmax"}), "head 'softmax'"),
        ("h_logits_unknown", "header", "CodecError", BJ, "logits 'some'", job({"logits": "some"}), "logits 'some'"),
        ("h_result_dtype", "header", "CodecError", BJ, "result_dtype", job({"result_dtype": "float8"}), "result_dtype float8"),
        ("h_session_wildcard", "header", "CodecError", BJ, "session id", job({"session_id": "s/+"}), "session id 's/+'"),
        ("h_job_id_newline", "header", "CodecError", BJ, "job id", lambda jid: payload_from_tensors(_feeds(), _meta(jid + "\n")), "header job id with a trailing newline"),
        ("h_model_hash_upper", "header", "CodecError", BJ, "model_hash", job({"model_hash": "A" * 64}), "upper-case model hash"),
        ("h_model_hash_short", "header", "CodecError", BJ, "model_hash", job({"model_hash": "a" * 63}), "63-digit model hash"),
        ("h_model_hash_wildcard", "header", "CodecError", BJ, "model_hash", job({"model_hash": "#"}), "model hash '#'"),
        ("h_question_empty", "header", "CodecError", BJ, "question must be", job(ans(question=""), {"image": img}), "answer job, empty question"),
        ("h_question_too_long", "header", "CodecError", BJ, "question must be", job(ans(question="q" * 2001), {"image": img}), "2001-character question"),
        ("h_question_surrogate", "header", "CodecError", BJ, "surrogate", job(ans(question="what \ud800?"), {"image": img}), "question with an unpaired surrogate"),
        ("h_max_new_tokens_zero", "header", "CodecError", BJ, "max_new_tokens", job(ans(max_new_tokens="0"), {"image": img}), "max_new_tokens 0"),
        ("h_exit_layer_negative", "header", "CodecError", BJ, "exit_layer", job(ans(exit_layer="-2"), {"image": img}), "exit_layer -2"),
        ("h_reply_bytes_not_probe", "header", "CodecError", BJ, "reply_bytes", job({"reply_bytes": "5"}), "reply_bytes on a split job"),
        ("h_probe_reply_over_cap", "header", "CodecError", BJ, "reply_bytes", job({"kind": "probe", "reply_bytes": str(1 << 30)}, {}), "probe asking 1 GiB"),
        # decoded and parsed, refused by the worker
        ("s_unknown_model", "server", None, "unknown_model", "has no model", job({"model_hash": "1" * 64}), "model hash no worker has"),
        ("s_unknown_model_zeros", "server", None, "unknown_model", "has no model", job({"model_hash": "0" * 64}), "all-zero model hash"),
        ("s_unknown_segment", "server", None, "unknown_segment", "split at one of", job({"segment": "decoder[1:7]"}), "decoder[1:7] of a 4-layer model"),
        ("s_unknown_segment_big", "server", None, "unknown_segment", "split at one of", job({"segment": "decoder[0:9999]"}), "decoder[0:9999]"),
        ("s_exit_head_wrong_layer", "server", None, "unknown_segment", "cannot follow layer 4", job({"head": "exit_head@3"}), "exit_head@3 after decoder[3:4]"),
        ("s_exit_head_missing", "server", None, "unknown_segment", "no segment exit_head@3", job({"segment": "decoder[2:3]", "head": "exit_head@3"}), "exit head the bundle lacks"),
        ("s_answer_exit_unknown", "server", None, "unknown_segment", "exit heads after layers", job(ans(exit_layer="3"), {"image": img}), "answer from exit layer 3"),
        ("s_probe_reply_over_limit", "server", None, "too_large", "reply bytes", job({"kind": "probe", "segment": "", "reply_bytes": str(200 << 20)}, {}), "probe asking 200 MiB"),
        ("s_wrong_shape", "server", None, "bad_input", "hidden_states", job(tensors={**_feeds(), "hidden_states": np.ones((1, 2, 7), np.float32)}), "hidden size 7, not 128"),
        ("s_wrong_dtype", "server", None, "bad_input", "hidden_states", job(tensors={**_feeds(), "hidden_states": np.ones((1, 2, 128), np.int8)}), "int8 hidden states"),
        ("s_wrong_rank", "server", None, "bad_input", "hidden_states", job(tensors={**_feeds(), "hidden_states": np.ones((256,), np.float32)}), "hidden states of rank 1"),
        ("s_missing_tensor", "server", None, "bad_input", "exactly the tensors", job(tensors={"hidden_states": np.ones((1, 2, 128), np.float32)}), "no position_ids / attention_mask"),
        ("s_extra_tensor", "server", None, "bad_input", "exactly the tensors", job(tensors={**_feeds(), "extra": np.zeros(1, np.uint8)}), "an extra tensor"),
        ("s_mask_length", "server", None, "bad_input", "attention_mask", job(tensors={**_feeds(), "attention_mask": np.ones((1, 5), np.int64)}), "mask of 5 for 2 tokens"),
        ("s_session_unknown", "server", None, "session_unknown", "holds no KV session", job({"session_id": "nope", "past_length": "4"}, {**_feeds(t=1), "attention_mask": np.ones((1, 5), np.int64)}), "decode step of a session nobody holds"),
        ("s_answer_not_image", "server", None, "bad_input", "cannot decode image", job(ans(), {"image": np.frombuffer(b"GIF89a-nope", np.uint8)}), "answer job, image bytes not an image"),
        ("s_answer_png_bomb", "server", None, "bad_input", "pixels", job(ans(), {"image": np.frombuffer(_header65k(), np.uint8)}), "answer job, 65535x65535 PNG header"),
        ("s_answer_image_2d", "server", None, "bad_input", "image must be", job(ans(), {"image": np.zeros((2, 3), np.uint8)}), "image as a 2-D array"),
        ("s_answer_image_float", "server", None, "bad_input", "image must be", job(ans(), {"image": np.zeros(8, np.float32)}), "image as float32"),
        ("s_answer_wrong_names", "server", None, "bad_input", "answer job takes", job(ans(), {"pixels": np.zeros(8, np.uint8)}), "tensor 'pixels'"),
        ("s_answer_tokens_shape", "server", None, "bad_input", "image_tokens must be", job(ans(), {"image_tokens": np.zeros((3, 7), np.float32), "keep": np.arange(3)}), "kept tokens (3, 7)"),
        ("s_answer_keep_out_of_range", "server", None, "bad_input", "keep indices", job(ans(), {"image_tokens": np.zeros((1, 128), np.float32), "keep": np.array([999])}), "keep index 999"),
        ("s_answer_keep_float", "server", None, "bad_input", "image_tokens must be", job(ans(), {"image_tokens": np.zeros((1, 128), np.float32), "keep": np.zeros(1, np.float32)}), "float keep indices"),
        ("s_answer_keep_negative", "server", None, "bad_input", "keep indices", job(ans(), {"image_tokens": np.zeros((1, 128), np.float32), "keep": np.array([-1])}), "keep index -1"),
        ("s_answer_keep_duplicates", "server", None, "bad_input", "keep", job(ans(), {"image_tokens": np.zeros((2, 128), np.float32), "keep": np.array([1, 1])}), "keep index 1 twice"),
        # kept tokens in an upload form (uploads.py): int8 needs its row scales, floats must be finite
        ("s_answer_int8_no_scales", "server", None, "bad_input", "int8 with image_token_scales", job(ans(), {"image_tokens": np.zeros((1, 128), np.int8), "keep": np.array([0])}), "int8 tokens without scales"),
        ("s_answer_scales_float_tokens", "server", None, "bad_input", "int8 with image_token_scales", job(ans(), {"image_tokens": np.zeros((1, 128), np.float32), "image_token_scales": np.ones(1, np.float32), "keep": np.array([0])}), "scales beside float tokens"),
        ("s_answer_scales_shape", "server", None, "bad_input", "need float32 scales", job(ans(), {"image_tokens": np.zeros((2, 128), np.int8), "image_token_scales": np.ones(3, np.float32), "keep": np.array([0, 1])}), "3 scales for 2 rows"),
        ("s_answer_scales_zero", "server", None, "bad_input", "finite and > 0", job(ans(), {"image_tokens": np.zeros((1, 128), np.int8), "image_token_scales": np.zeros(1, np.float32), "keep": np.array([0])}), "a zero row scale"),
        ("s_answer_scales_nan", "server", None, "bad_input", "finite and > 0", job(ans(), {"image_tokens": np.zeros((1, 128), np.int8), "image_token_scales": np.full(1, np.nan, np.float32), "keep": np.array([0])}), "a NaN row scale"),
        ("s_answer_tokens_nan", "server", None, "bad_input", "NaN or infinite", job(ans(), {"image_tokens": np.full((1, 128), np.nan, np.float32), "keep": np.array([0])}), "NaN float tokens"),
        ("s_answer_tokens_int64", "server", None, "bad_input", "float32 or float16", job(ans(), {"image_tokens": np.zeros((1, 128), np.int64), "keep": np.array([0])}), "int64 tokens"),
        ("s_answer_question_placeholder", "server", None, "bad_input", "placeholder", job(ans(question="what is <image>?"), {"image": img}), "question with the image placeholder"),
        # token-level speculation blocks: malformed, lost or out of order
        ("h_verify_no_session", "header", "CodecError", BJ, "needs a session_id", job({"kind": "verify", "segment": "", "question": Q}, {"draft": np.zeros(0, np.int64)}), "verify job without a session"),
        ("s_verify_no_draft", "server", None, "bad_input", "needs a draft tensor", job(ver(), {"image": img}), "first verify block without drafts"),
        ("s_verify_draft_float", "server", None, "bad_input", "1-D integer array", job(ver(), {"image": img, "draft": np.zeros(2, np.float32)}), "float32 drafts"),
        ("s_verify_draft_2d", "server", None, "bad_input", "1-D integer array", job(ver(), {"image": img, "draft": np.zeros((1, 2), np.int64)}), "drafts of rank 2"),
        ("s_verify_draft_out_of_vocab", "server", None, "bad_input", "token ids must lie in", job(ver(), {"image": img, "draft": np.array([10**9])}), "draft token 10^9"),
        ("s_verify_not_an_image", "server", None, "bad_input", "cannot decode image", job(ver(), {"image": np.frombuffer(b"GIF89a-nope", np.uint8), "draft": np.zeros(1, np.int64)}), "first block, image bytes not an image"),
        ("s_verify_session_unknown", "server", None, "session_unknown", "no speculation session", job(ver(past_length="3", question=""), {"draft": np.zeros(1, np.int64)}), "block 4 of a session nobody holds"),
        ("s_verify_prompt_again", "server", None, "bad_input", "only draft", job(ver(past_length="2", question=""), {"image": img, "draft": np.zeros(1, np.int64)}), "a later block re-sending the image"),
        ("s_job_id_mismatch", "server", None, "bad_job", "differs from CorrelationData", lambda jid: payload_from_tensors(_feeds(), _meta("someone-else")), "header job id differs from CorrelationData"),
    ]
    # fmt: on
    out = []
    for i, (name, stage, error, code, match, data, what) in enumerate(c):
        job_id = f"corpus-{i:03d}-{name.replace('_', '-')}"[:64]
        payload = data(job_id) if callable(data) else data
        spec = {"name": name, "file": f"{name}.safetensors" if payload[:4] != b"\x28\xb5\x2f\xfd" else f"{name}.zst", "what": what,
                "data": payload, "stage": stage, "job_id": job_id, "code": code, "match": match,
                "needs_model_hash": PLACEHOLDER_HASH.encode() in payload}  # fmt: skip
        if error:
            spec["error"] = error
        out.append(spec)
    # valid jobs whose MQTT properties leave no one to answer: the worker drops them with a warning
    for k, (name, what, corr, topic) in enumerate((
        ("d_no_response_topic", "no ResponseTopic", "JOB", None),
        ("d_no_correlation", "no CorrelationData", None, "REPLY"),
        ("d_correlation_newline", "CorrelationData 'job\\n'", b"job\n".hex(), "REPLY"),
        ("d_correlation_not_utf8", "CorrelationData FF FE", "fffe", "REPLY"),
        ("d_correlation_wildcard", "CorrelationData 'a/+'", b"a/+".hex(), "REPLY"),
        ("d_correlation_too_long", "65-byte CorrelationData", (b"a" * 65).hex(), "REPLY"),
        ("d_correlation_empty", "empty CorrelationData", "", "REPLY"),
        ("d_response_topic_plus", "ResponseTopic with +", "JOB", "REPLY/+/x"),
        ("d_response_topic_hash", "ResponseTopic with #", "JOB", "REPLY/#"),
    )):  # fmt: skip
        jid = f"corpus-drop-{k}"
        out.append({"name": name, "file": f"{name}.safetensors", "what": what, "data": payload_from_tensors(_feeds(), _meta(jid)),
                    "stage": "properties", "job_id": jid, "drop": True, "correlation_hex": jid.encode().hex() if corr == "JOB" else corr,
                    "response_topic": topic, "match": "no ResponseTopic or no valid CorrelationData", "needs_model_hash": True})  # fmt: skip
    return out


# -- chunks of chunked messages ----------------------------------------------------------------


def chunk_cases() -> list[dict[str, Any]]:
    """Chunk sequences (msao-chunk property + size); the chunk at ``fail_at`` is refused, those before it accepted."""
    lim = JOB_MAX_PAYLOAD_BYTES
    # fmt: off
    c: list[tuple] = [
        ("not_five_fields", [("abc", 3)], "CodecError", "is not '<id>"),
        ("empty_property", [("", 0)], "CodecError", "is not '<id>"),
        ("bad_id", [("a b:0:2:10:5", 5)], "CodecError", "is not '<id>"),
        ("id_too_long", [("x" * 65 + ":0:2:10:5", 5)], "CodecError", "is not '<id>"),
        ("id_wildcard", [("a+:0:2:10:5", 5)], "CodecError", "is not '<id>"),
        ("negative_index", [("m:-1:2:10:5", 5)], "CodecError", "is not '<id>"),
        ("leading_space", [(" m:0:1:5:5", 5)], "CodecError", "is not '<id>"),
        ("trailing_newline", [("m:0:1:5:5\n", 5)], "CodecError", "is not '<id>"),
        ("index_equals_count", [("m:2:2:10:5", 5)], "CodecError", "out of range"),
        ("count_zero", [("m:0:0:0:5", 0)], "CodecError", "out of range"),
        ("chunk_bytes_zero", [("m:0:1:0:0", 0)], "CodecError", "out of range"),
        ("count_inconsistent", [("m:0:3:10:5", 5)], "CodecError", "cannot hold"),
        ("count_over_max", [("m:0:99999:99999:1", 1)], "CodecError", "out of range"),
        ("total_over_limit", [(f"m:0:2:{2 * lim + 2}:{lim + 1}", 16)], "PayloadTooLarge", "over the limit"),
        ("chunk_bytes_12_digits", [("m:0:2:999999999999:500000000000", 16)], "CodecError", "is not '<id>"),
        ("data_short", [("m:0:2:10:5", 3)], "CodecError", "has 3 bytes, its header says 5"),
        ("last_chunk_long", [("m:1:2:10:6", 6)], "CodecError", "has 6 bytes, its header says 4"),
        ("disagreeing_chunks", [("m:0:2:10:5", 5), ("m:1:3:15:5", 5)], "CodecError", "disagrees with the first chunk"),
        ("too_many_partials", [(f"p{i}:0:2:10:5", 5) for i in range(17)], "PayloadTooLarge", "already in reassembly"),
        ("buffered_over", [(f"b{i}:0:2:{lim}:{lim // 2}", lim // 2) for i in range(5)], "PayloadTooLarge", "reassembly buffers would hold"),
    ]
    # fmt: on
    out = []
    for name, chunks, error, match in c:
        out.append({"name": name, "what": f"{len(chunks)} chunk(s): {chunks[-1][0][:60]!r} with {chunks[-1][1]} bytes last",
                    "chunks": [{"property": p, "bytes": n} for p, n in chunks], "fail_at": len(chunks) - 1, "error": error, "match": match,
                    "drop": True, "wire": not any(ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F for p, _ in chunks for ch in p)})  # fmt: skip
    return out


# -- ids and topics ---------------------------------------------------------------------------


def topic_cases() -> list[dict[str, Any]]:
    ids = [("empty", ""), ("plus", "a+b"), ("hash", "a#"), ("lone_plus", "+"), ("lone_hash", "#"), ("slash", "a/b"), ("dotdot", ".."),
           ("dot_dot_inside", "a..b"), ("traversal", "../x"), ("dollar", "$SYS"), ("space", "a b"), ("too_long", "x" * 65),
           ("newline", "id\n"), ("crlf", "id\r\n"), ("nul", "\u0000"), ("accent", "\u00e4"), ("fullwidth", "\uff49\uff44"), ("dot", "a.b"),
           ("colon", "a:b"), ("percent", "%2F"), ("tab", "id\t"), ("rtl_override", "\u202eid"), ("zero_width", "i\u200bd")]  # fmt: skip
    hashes = [("empty", ""), ("upper", "A" * 64), ("short", "a" * 63), ("long", "a" * 65), ("not_hex", "g" * 64), ("newline", "a" * 64 + "\n"),
              ("plus", "+" * 64), ("hash", "#"), ("traversal", "../" + "a" * 61), ("slash", "a" * 32 + "/" + "a" * 31)]  # fmt: skip
    topics = [("plus", "a/+/b", "wildcard"), ("hash", "a/#", "wildcard"), ("lone_hash", "#", "wildcard"), ("lone_plus", "+", "wildcard"),
              ("sys", "$SYS/broker/x", "reserved"), ("share", "$share/g/t", "reserved"), ("too_long", "t/" + "x" * 255, "over the limit of 256"),
              ("empty", "", "empty"), ("nul", "a\u0000b", "NUL")]  # fmt: skip
    out = []
    for n, v in ids:
        out.append({"name": f"id_{n}", "what": f"id {v!r}", "kind": "id", "value": v, "error": "ConfigError", "match": "is not a valid id",
                    "wire": v != ""})  # fmt: skip
    for n, v in hashes:
        out.append({"name": f"hash_{n}", "what": f"model hash {v[:20]!r}", "kind": "hash", "value": v, "error": "ConfigError",
                    "match": "is not 64 lower-case hex digits", "wire": True})  # fmt: skip
    for n, v, m in topics:
        out.append({"name": f"response_topic_{n}", "what": f"ResponseTopic {v[:24]!r}", "kind": "response_topic", "value": v, "error": "problem",
                    "match": m, "wire": v != "" and "\u0000" not in v})  # fmt: skip
    return out


# -- writing ------------------------------------------------------------------------------------

PARSERS = {
    "edge_request": "MqttIntake._parse: request_from_json when the payload starts with '{', else request_from_raw_image (stage decode: "
    "then decode_image; stage serve: then the runtime's prompt check)",
    "http_chat": "openai_chat.call_from_chat (raises RequestError with a code, OPENAI_ERRORS gives its HTTP status; stage decode: "
    "then decode_image)",
    "http_raw": "the HTTP intake's request line, header and body handling (no in-process parser: live test only)",
    "image": "msao.engines.images.decode_image",
    "job": "tensors_from_payload then JobHeader.from_metadata (stage server: the worker refuses it; stage properties: its MQTT properties)",
    "chunk": "ChunkHeader.from_property then Reassembler.add",
    "topic": "check_id (id), job_topic (hash), response_topic_problem (response_topic)",
}
WIRE = {
    "edge_request": "published to msao/v1/edge/<id>/request; answered with status error and error_code = code",
    "http_chat": "POST /v1/chat/completions; HTTP status and OpenAI error.code = code",
    "http_raw": "sent on a raw socket; HTTP status = status",
    "image": "as a raw-image edge request (bad_image), an HTTP data URI (400 bad_image) and an answer job (bad_input)",
    "job": "published to the worker's job topic; a result with status error and error_code = code, or dropped (logged) when drop",
    "chunk": "published as chunks with the msao-chunk property; dropped (logged), no result (wire false: Mosquitto itself refuses "
    "control characters in MQTT strings and disconnects the sender)",
    "topic": "id: edge request_id (bad_request) and job CorrelationData (dropped); hash: job model_hash (bad_job); "
    "response_topic: edge ResponseTopic (bad_request on the default topic) and job ResponseTopic (wildcards dropped)",
}


def write_corpus(root: Path = CORPUS_DIR) -> dict[str, int]:
    """Rewrite every target folder under ``root``; return the number of cases per target."""
    builders = {"edge_request": edge_request_cases, "http_chat": http_chat_cases, "http_raw": http_raw_cases, "image": image_cases,
                "job": job_cases, "chunk": chunk_cases, "topic": topic_cases}  # fmt: skip
    assert tuple(builders) == TARGETS
    counts = {}
    for target, build in builders.items():
        cases = build()
        names = [c["name"] for c in cases]
        assert len(set(names)) == len(names), f"{target}: duplicate case names"
        folder = root / target
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        for c in cases:
            if "huge_int" in c["name"] or c["name"] == "h_past_length_huge":
                c["requires"] = "int_max_str_digits"  # Python >= 3.10.7 / 3.11: longer int literals are refused by int()
            data = c.pop("data", None)
            if data is not None:
                (folder / c["file"]).write_bytes(data)
        doc = {"target": target, "parser": PARSERS[target], "wire": WIRE[target], "cases": cases}
        (folder / "manifest.json").write_text(json.dumps(doc, indent=1, ensure_ascii=True) + "\n")
        counts[target] = len(cases)
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=CORPUS_DIR, help="root folder (default: tests/corpus)")
    args = ap.parse_args()
    counts = write_corpus(args.out)
    total_bytes = sum(f.stat().st_size for t in TARGETS for f in (args.out / t).iterdir())
    print(
        f"{sum(counts.values())} cases, {total_bytes / 1024:.0f} KiB under {args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items())
    )


if __name__ == "__main__":
    main()
