"""Upload forms on real images and real bundles: what each form builds, and when a pair may use it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from msao.cloud_bridge.codec import dequantize_rows, quantize_rows
from msao.edge_runtime.plans import UPLOAD_FORMS, Plan
from msao.edge_runtime.uploads import forms_for, region_image, shares_encoder, token_upload_bytes, upload_tensors
from msao.engines.images import decode_image, fitted_image
from msao.engines.mas import patch_grid
from msao.errors import CodecError, ConfigError

SCHEMA = Path(__file__).resolve().parents[2] / "docs" / "schemas" / "edge-response.schema.json"


def _camera_jpeg(rgb: np.ndarray, size=(1280, 960), quality=95) -> bytes:
    """What a camera sends: the scene at a camera's resolution with sensor noise, a high-quality JPEG (zstd cannot shrink it)."""
    import io

    from PIL import Image

    big = np.asarray(Image.fromarray(rgb).resize(size, Image.BICUBIC), np.float32)
    noisy = np.clip(big + np.random.default_rng(0).normal(0, 4, big.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noisy).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def test_the_response_schema_names_exactly_the_upload_forms():
    schema = json.loads(SCHEMA.read_text())
    assert schema["properties"]["upload"]["enum"] == ["", *UPLOAD_FORMS] and "upload" in schema["required"]


def test_a_jpeg_form_is_the_image_at_the_cloud_models_input_size_and_far_smaller_than_a_camera_file(models, easyvqa_test):
    _, large = models
    pre = large.manifest.preprocess
    camera = _camera_jpeg(easyvqa_test.images[0])
    rgb = decode_image(camera)
    sizes = {}
    for form in ("jpeg@90", "jpeg@70", "jpeg@50"):
        t = upload_tensors(form, image_file=camera, rgb=rgb, keep=None, preprocess=pre, n_tokens=large.n_tokens)
        assert set(t) == {"image"}
        sent = decode_image(t["image"].tobytes())
        assert sent.shape == (pre.crop_height, pre.crop_width, 3)
        assert np.abs(sent.astype(int) - fitted_image(rgb, pre).astype(int)).mean() < 12  # the same picture, a little lossy
        sizes[form] = t["image"].size
    assert sizes["jpeg@50"] < sizes["jpeg@70"] < sizes["jpeg@90"] < len(camera) / 10
    file = upload_tensors("file", image_file=camera, rgb=rgb, keep=None, preprocess=pre, n_tokens=large.n_tokens)
    assert file["image"].tobytes() == camera


def test_a_region_form_keeps_the_kept_patches_and_flattens_the_rest(models, easyvqa_test):
    _, large = models
    pre = large.manifest.preprocess
    fitted = fitted_image(easyvqa_test.images[3], pre)
    keep = np.array([0, 5, 9, 27, 63])
    out = region_image(fitted, keep, large.n_tokens)
    rows, cols, patch = patch_grid(large.n_tokens, *fitted.shape[:2])
    for i in range(rows * cols):
        r, c = divmod(i, cols)
        block = out[r * patch : (r + 1) * patch, c * patch : (c + 1) * patch]
        if i in keep:
            assert np.array_equal(block, fitted[r * patch : (r + 1) * patch, c * patch : (c + 1) * patch])
        else:
            assert (block == block[0, 0]).all()  # one flat colour: a few bytes per JPEG block
    t = upload_tensors("region@70", image_file=b"x", rgb=easyvqa_test.images[3], keep=keep, preprocess=pre, n_tokens=large.n_tokens)
    assert t["keep"].tolist() == keep.tolist()
    with pytest.raises(ConfigError, match="keep-set"):
        upload_tensors("region@70", image_file=b"x", rgb=easyvqa_test.images[3], keep=None, preprocess=pre, n_tokens=large.n_tokens)


def test_int8_rows_cost_a_quarter_of_float32_and_stay_within_half_a_step(models, easyvqa_test):
    _, large = models
    tokens = large.prepare(easyvqa_test.images[0], "what shape is it?", analyse=False).encoding.tokens
    q, scale = quantize_rows(tokens)
    assert q.dtype == np.int8 and scale.shape == (tokens.shape[0],)
    back = dequantize_rows(q, scale)
    assert (np.abs(back - tokens) <= scale[:, None] / 2 + 1e-6).all()
    keep = np.arange(0, tokens.shape[0], 4)
    t = upload_tensors("tokens@int8", image_file=b"x", rgb=None, keep=keep, preprocess=large.manifest.preprocess, n_tokens=large.n_tokens, tokens=tokens)
    assert set(t) == {"image_tokens", "image_token_scales", "keep"} and t["image_tokens"].shape == (len(keep), tokens.shape[1])
    assert sum(v.nbytes for v in t.values()) == token_upload_bytes("tokens@int8", len(keep), tokens.shape[1])
    half = upload_tensors("tokens@fp16", image_file=b"x", rgb=None, keep=None, preprocess=large.manifest.preprocess, n_tokens=large.n_tokens, tokens=tokens)
    assert half["image_tokens"].dtype == np.float16 and half["keep"].tolist() == list(range(tokens.shape[0]))
    with pytest.raises(CodecError, match="finite"):
        quantize_rows(np.full((2, 3), np.nan, np.float32))


def test_only_a_pair_sharing_its_vision_encoder_may_send_tokens(models):
    edge, large = models
    assert not shares_encoder(edge.manifest, large.manifest)
    assert shares_encoder(large.manifest, large.manifest)
    assert "tokens@int8" not in forms_for(send_keep=True, shared_encoder=False)
    assert "region@70" not in forms_for(send_keep=False, shared_encoder=True)
    assert forms_for(send_keep=True, shared_encoder=True) == UPLOAD_FORMS


def test_a_text_only_request_uploads_nothing_in_any_form(models):
    _, large = models
    for form in UPLOAD_FORMS:
        assert upload_tensors(form, image_file=b"", rgb=None, keep=None, preprocess=large.manifest.preprocess, n_tokens=large.n_tokens) == {}


def test_an_unknown_upload_form_is_refused():
    with pytest.raises(ConfigError, match="upload form"):
        Plan("cloud", 1.0, upload="png@9")
