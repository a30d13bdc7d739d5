"""What a cloud job carries for the image, in each of ``UPLOAD_FORMS``, and which forms a pair allows.

Cloud-only sends the request's image file as it came: a camera's JPEG of whatever size it
shot, though the cloud model sees it fitted to its input (336 px for LLaVA-1.5), so every pixel
beyond that crosses the link for nothing. The plan picks the form instead:

    file          the request's file, unchanged (what cloud-only sends)
    jpeg@q        the image fitted to the cloud model's input (``fitted_image``), JPEG quality q
    region@q      jpeg@q with every patch outside the edge's keep-set flattened to the kept
                  pixels' mean colour (a flat 8x8 JPEG block costs a few bytes), sent with the
                  keep-set. The cloud's encoder still sees the whole canvas, so the kept tokens'
                  features change a little: calibration measures what that costs.
    tokens@fp16   the edge encoder's kept image tokens (K, D) in float16 with the keep-set: the
                  cloud skips its vision encoder. Only where both models share one vision
                  encoder (the same file hash): the tokens must be the cloud model's own.
    tokens@int8   the same as int8 with one float32 scale per row (``quantize_rows``)

Each form's accuracy and mean bytes come from the calibration (train data); the scheduler
never takes a form whose accuracy falls outside its slack, which is how a form that costs too
much accuracy is refused.
"""

from __future__ import annotations

import io

import numpy as np

from msao.cloud_bridge.codec import quantize_rows
from msao.edge_runtime.plans import UPLOAD_FORMS
from msao.engines.images import ImagePreprocess, fitted_image
from msao.engines.manifest import Manifest
from msao.engines.mas import patch_grid
from msao.errors import ConfigError

__all__ = ["form_quality", "forms_for", "jpeg_file", "region_image", "shares_encoder", "token_upload_bytes", "upload_tensors"]


def form_quality(form: str) -> int:
    """The JPEG quality of a ``jpeg@q`` or ``region@q`` form."""
    kind, _, q = form.partition("@")
    if kind not in ("jpeg", "region"):
        raise ConfigError(f"upload form {form!r} has no JPEG quality")
    return int(q)


def shares_encoder(edge: Manifest, large: Manifest) -> bool:
    """Whether the edge's vision encoder is the large model's, file for file (then its tokens are the cloud's own)."""

    def encoder_files(m: Manifest) -> tuple[str, ...]:
        seg = next((s for s in m.segments if s.name == "vision_encoder"), None)
        if seg is None:
            return ()
        names = (seg.file, *seg.external_data)
        return tuple(f.sha256 for f in m.files if f.path in names)

    return (
        edge.model.hidden_size == large.model.hidden_size
        and edge.model.image_tokens == large.model.image_tokens
        and bool(encoder_files(edge))
        and encoder_files(edge) == encoder_files(large)
        and edge.preprocess == large.preprocess
    )


def forms_for(send_keep: bool, shared_encoder: bool) -> tuple[str, ...]:
    """The forms a cloud job may take: region needs a keep-set, tokens a shared encoder."""
    out = []
    for form in UPLOAD_FORMS:
        kind = form.partition("@")[0]
        if (kind == "region" and not send_keep) or (kind == "tokens" and not shared_encoder):
            continue
        out.append(form)
    return tuple(out)


def jpeg_file(rgb: np.ndarray, quality: int) -> bytes:
    """A baseline JPEG with full-resolution colour (4:4:4), no optimisation pass (the edge pays for every millisecond).

    Not 4:2:0: at a model's input size a small object spans a few pixels, and halving the
    colour resolution bleeds its colour into the background, which is what a "what colour is
    the ..." question asks about. On 600 scenes *validation* questions the cloud model lost 3.7
    points with 4:2:0 at quality 70 (0.715 vs 0.752 from the file) and 0.7 with 4:4:4 (0.745),
    whose quality-50 file (4.1 KB) is smaller than 4:2:0's at 70 (4.7 KB) and 2.8 points better.
    """
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, "JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def region_image(fitted: np.ndarray, keep: np.ndarray, n_tokens: int) -> np.ndarray:
    """``fitted`` with every patch outside ``keep`` set to the kept pixels' mean colour.

    Args:
        fitted: uint8 (H, W, 3) at the model's input size (``fitted_image``).
        keep: kept token indices, row-major over the patch grid of ``n_tokens`` tokens.
    """
    h, w = fitted.shape[:2]
    rows, cols, patch = patch_grid(n_tokens, h, w)
    mask = np.zeros(rows * cols, bool)
    mask[np.asarray(keep, np.int64)] = True
    pixel_mask = np.repeat(np.repeat(mask.reshape(rows, cols), patch, axis=0), patch, axis=1)
    out = fitted.copy()
    if pixel_mask.any():
        out[~pixel_mask] = np.rint(fitted[pixel_mask].mean(axis=0)).astype(np.uint8)
    return out


def token_upload_bytes(form: str, kept: int, width: int) -> int:
    """Payload bytes of a tokens form before zstd: the tokens, the int8 scales, the int64 keep-set."""
    per = 2 if form == "tokens@fp16" else 1
    return kept * width * per + (4 * kept if form == "tokens@int8" else 0) + 8 * kept


def upload_tensors(
    form: str,
    *,
    image_file: bytes,
    rgb: np.ndarray | None,
    keep: np.ndarray | None,
    preprocess: ImagePreprocess,
    n_tokens: int,
    tokens: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """The prompt tensors of a cloud job (an answer job's or a first verify block's) in ``form``.

    Args:
        image_file: the request's file (the ``file`` form; b"" for a text-only request).
        rgb: the decoded request image (every other form; None with b"" for a text-only request).
        keep: the edge's keep-set, sent beside the image (None: the cloud prefills every token).
        preprocess / n_tokens: the cloud model's input and its image-token count.
        tokens: the edge encoder's image tokens (N, D), for the tokens forms.
    """
    if form not in UPLOAD_FORMS:
        raise ConfigError(f"upload form {form!r} not in {UPLOAD_FORMS}")
    out: dict[str, np.ndarray] = {}
    kind = form.partition("@")[0]
    if rgb is None and not image_file:  # a text-only turn: the job carries no tensor
        return out
    if kind == "file":
        if not image_file:
            raise ConfigError("upload file needs the request's image file")
        out["image"] = np.frombuffer(image_file, np.uint8)
    elif kind in ("jpeg", "region"):
        if rgb is None:
            raise ConfigError(f"upload {form} needs the decoded image")
        fitted = fitted_image(rgb, preprocess)
        if kind == "region":
            if keep is None:
                raise ConfigError("upload region@q needs the edge's keep-set")
            fitted = region_image(fitted, keep, n_tokens)
        out["image"] = np.frombuffer(jpeg_file(fitted, form_quality(form)), np.uint8)
    else:
        if tokens is None:
            raise ConfigError(f"upload {form} needs the edge encoder's image tokens")
        keep = np.arange(tokens.shape[0]) if keep is None else keep
        kept = np.asarray(tokens, np.float32)[np.asarray(keep, np.int64)]
        if form == "tokens@fp16":
            out["image_tokens"] = kept.astype(np.float16)
        else:
            out["image_tokens"], out["image_token_scales"] = quantize_rows(kept)
    if keep is not None:
        out["keep"] = np.asarray(keep, np.int64)
    return out
