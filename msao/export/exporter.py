"""``msao export``: a LLaVA, Qwen2-VL or Qwen2.5-VL checkpoint → a verified, hash-listed bundle of ONNX segments.

Steps, each reported through ``progress``: load the checkpoint (a built-in name or a local
folder; nothing downloads) → cut it into segment modules → export each to ONNX → compare each
with PyTorch on real inputs of the model's workload (prefill, decode, left-padded batch) → answer test
questions from the ONNX files alone and compare with Hugging Face ``generate`` → measure a
latency profile → write the manifest. Everything is written to a temporary sibling folder
and renamed into place at the end, so a failed export never leaves a half bundle.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

import msao
from msao.datasets.vqa import load_vqa
from msao.engines.bundle import load_bundle, sha256_of_file
from msao.engines.generation import Generator
from msao.engines.images import pixels_from_image
from msao.engines.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    BundleChecks,
    FileEntry,
    Manifest,
    ModelInfo,
    PromptSpec,
    SegmentCheck,
    SegmentSpec,
    TensorSpec,
    decoder_segment_name,
    exit_segment_name,
)
from msao.engines.onnxruntime_backend import OnnxRuntimeBackend, OrtOptions
from msao.engines.profile import profile_bundle
from msao.errors import ExportCheckFailed, ModelFolderError
from msao.export.builtin import BUILTIN_MODELS, PROMPT_TEMPLATE, builtin_checkpoint_dir
from msao.export.checkpoint import ARCHITECTURES, LlavaCheckpoint, load_checkpoint
from msao.export.flops import flops_model_from_module, torch_feeds
from msao.export.onnx_export import OPSET, onnx_from_segment
from msao.export.qwen import QWEN_PROMPT_TEMPLATE, QwenVisionEncoder, check_vision_against_hf, hf_vision_inputs
from msao.export.reference import TorchPipeline, hf_greedy_answer
from msao.export.segments import DecoderChunk, LmHead, TextEmbed, VisionEncoder
from msao.progress import progress_bar

__all__ = ["ExportOptions", "export_bundle", "model_hash_from_checkpoint", "resolve_model"]


@dataclass(frozen=True)
class ExportOptions:
    """What to export and how hard to check it.

    Attributes:
        split_points: decoder layer boundaries to cut chunks at (edge/cloud split candidates);
            None = the built-in model's own, or the middle layer for other checkpoints.
        mas_feature_layer: vision layer the MAS probe reads; None = built-in's or 1/4 depth.
        prompt_template: None = LLaVA-1.5's conversation format (the built-ins use it too), or
            Qwen's chat template for the Qwen families.
        check_questions: questions answered by both ONNX and HF ``generate`` (and checking segments).
        check_dataset: where they come from (``easy-vqa`` test, ``scenes`` validation); None = the
            built-in model's own workload, easy-VQA for other checkpoints. A model's tokenizer
            must know the words: a scenes model checked on easy-VQA questions would see <unk>s.
        check_atol: error allowed per segment output (fp32), absolute for outputs of magnitude
            up to 1 and relative above: |onnx - torch| <= check_atol * max(1, max |torch|).
        max_new_tokens: generation bound for the end-to-end check.
        profile_repeats: timed runs per profile point (0 skips profiling).
        threads: ONNX Runtime threads for checks and profile.
        image_size: (H, W) pixels of a Qwen model's declared image grid (multiples of patch x
            merge, inside the processor's min/max pixels); None = the processor's size for a
            448x448 image. Fixes the bundle's image tokens; LLaVA takes its processor's crop.
    """

    split_points: tuple[int, ...] | None = None
    mas_feature_layer: int | None = None
    prompt_template: str | None = None
    check_questions: int = 200
    check_dataset: str | None = None
    check_atol: float = 1e-4
    max_new_tokens: int = 8
    profile_repeats: int = 20
    threads: int = 2
    opset: int = OPSET
    image_size: tuple[int, int] | None = None


def resolve_model(model: str | Path) -> Path:
    """A built-in model name → its checkpoint folder; anything else must be a local folder."""
    if str(model) in BUILTIN_MODELS:
        folder = builtin_checkpoint_dir(str(model))
        if not (folder / "config.json").exists():
            raise ModelFolderError(f"built-in model {model} has no checkpoint at {folder}; run `make models` to train it")
        return folder
    folder = Path(model)
    if not folder.exists():
        raise ModelFolderError(
            f"{model}: neither a built-in model ({', '.join(BUILTIN_MODELS)}) nor an existing folder; "
            "pass a local Hugging Face LLaVA, Qwen2-VL or Qwen2.5-VL checkpoint directory (nothing is downloaded)"
        )
    return folder


def model_hash_from_checkpoint(ck: LlavaCheckpoint) -> str:
    """Identity of a model: config, every weight (name, dtype, shape, bytes), exit heads, tokenizer.

    Stable across re-exports of the same checkpoint; edge and cloud refuse to pair bundles
    whose hashes differ.
    """
    h = hashlib.sha256()
    h.update(json.dumps(ck.model.config.to_dict(), sort_keys=True, default=str).encode())
    tensors = dict(ck.model.state_dict())
    if ck.exit_heads is not None:
        tensors.update({f"msao_exit.{k}": v for k, v in ck.exit_heads.state_dict().items()})
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(ck.tokenizer_json.encode())
    return h.hexdigest()


def _vision_module(ck: LlavaCheckpoint, mas_layer: int) -> torch.nn.Module:
    return VisionEncoder(ck.model, mas_layer) if ck.mrope is None else QwenVisionEncoder(ck.model, ck.mrope, mas_layer)


def _vision_width(vc) -> int:
    """Width of the vision blocks: Qwen2-VL calls it embed_dim (its hidden_size is the merger's output)."""
    return vc.embed_dim if vc.model_type == "qwen2_vl_vision" else vc.hidden_size


def _model_info(ck: LlavaCheckpoint, image_tokens: int) -> ModelInfo:
    cfg = ck.model.config
    tc, vc = cfg.text_config, cfg.vision_config
    heads = tc.num_attention_heads
    eos = tc.eos_token_id if tc.eos_token_id is not None else getattr(ck.model.generation_config, "eos_token_id", None)
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    if not eos_ids:
        raise ModelFolderError(f"{ck.folder}: no eos_token_id in the text config or generation config; generation could not stop")
    pad = tc.pad_token_id if tc.pad_token_id is not None else eos_ids[0]
    return ModelInfo(
        architecture=ARCHITECTURES[ck.family],
        vision_model_type=vc.model_type,
        text_model_type=tc.model_type,
        num_layers=tc.num_hidden_layers,
        hidden_size=tc.hidden_size,
        num_heads=heads,
        num_kv_heads=getattr(tc, "num_key_value_heads", None) or heads,
        head_dim=getattr(tc, "head_dim", None) or tc.hidden_size // heads,
        vocab_size=tc.vocab_size,
        image_tokens=image_tokens,
        vision_hidden_size=_vision_width(vc),
        max_positions=tc.max_position_embeddings,
        bos_token_id=tc.bos_token_id,
        eos_token_ids=eos_ids,
        pad_token_id=pad,
        image_token_id=cfg.image_token_id,
        parameters=sum(p.numel() for p in ck.model.parameters()),
        family=ck.family,
        mrope=ck.mrope,
    )


def _segments(ck: LlavaCheckpoint, info: ModelInfo, bounds: list[int], mas_layer: int) -> list[tuple[SegmentSpec, torch.nn.Module]]:
    """Segment specs (without checks) and the modules that implement them, in execution order."""
    m = ck.model
    pre = ck.preprocess
    d, v, hkv, hd = info.hidden_size, info.vocab_size, info.num_kv_heads, info.head_dim
    f32 = "float32"
    out: list[tuple[SegmentSpec, torch.nn.Module]] = [
        (
            SegmentSpec(
                "vision_encoder", "vision_encoder", "vision_encoder.onnx",
                inputs=(TensorSpec("pixel_values", f32, ("batch", 3, pre.crop_height, pre.crop_width)),),
                outputs=(
                    TensorSpec("image_tokens", f32, ("batch", info.image_tokens, d)),
                    TensorSpec("mas_features", f32, ("batch", info.image_tokens, info.vision_hidden_size)),
                ),
            ),
            _vision_module(ck, mas_layer),
        ),
        (
            SegmentSpec(
                "text_embed", "text_embed", "text_embed.onnx",
                inputs=(TensorSpec("input_ids", "int64", ("batch", "seq")),),
                outputs=(TensorSpec("embeddings", f32, ("batch", "seq", d)),),
            ),
            TextEmbed(m),
        ),
    ]  # fmt: skip
    positions = ("batch", "seq") if info.mrope is None else (3, "batch", "seq")  # M-RoPE: (t, h, w) ids per token
    for a, b in zip(bounds, bounds[1:]):
        past = tuple(TensorSpec(f"past_{kv}_{i}", f32, ("batch", hkv, "past", hd)) for i in range(a, b) for kv in ("key", "value"))
        new_kv = tuple(TensorSpec(f"new_{kv}_{i}", f32, ("batch", hkv, "seq", hd)) for i in range(a, b) for kv in ("key", "value"))
        spec = SegmentSpec(
            decoder_segment_name(a, b), "decoder", f"decoder_{a}_{b}.onnx",
            inputs=(
                TensorSpec("hidden_states", f32, ("batch", "seq", d)),
                TensorSpec("position_ids", "int64", positions),
                TensorSpec("attention_mask", "int64", ("batch", "past+seq")),
                *past,
            ),
            outputs=(TensorSpec("hidden_states_out", f32, ("batch", "seq", d)), *new_kv),
            layers=(a, b),
        )  # fmt: skip
        out.append((spec, DecoderChunk(m, a, b)))
    head_io = dict(
        inputs=(TensorSpec("hidden_states", f32, ("batch", "seq", d)),),
        outputs=(TensorSpec("logits", f32, ("batch", "seq", v)),),
    )
    out.append((SegmentSpec("lm_head", "lm_head", "lm_head.onnx", **head_io), LmHead(m)))
    for k in ck.exit_heads.layers if ck.exit_heads is not None else ():
        out.append((SegmentSpec(exit_segment_name(k), "exit_head", f"exit_head_{k}.onnx", layers=(k, k), **head_io), ck.exit_heads[k]))
    return out


def _check_samples(n: int, dataset: str, seed: int = 0) -> list[tuple[bytes, np.ndarray, str, str]]:
    """Real samples of ``dataset``: (png bytes, rgb, question, answer), spread over the split.

    easy-VQA has no validation split, so its test split serves; scenes use validation (these
    checks compare ONNX with PyTorch and tune nothing, but test data stays for the benchmarks).
    """
    data = load_vqa(dataset, "validation" if dataset == "scenes" else "test")
    rows = np.random.default_rng(seed).permutation(len(data))[:n]
    return [(data.image_pngs[data.image_ids[r]], data.images[data.image_ids[r]], data.questions[r], data.answers[r]) for r in rows]


def export_bundle(
    model: str | Path,
    out_dir: str | Path,
    options: ExportOptions = ExportOptions(),
    progress: Callable[[str], None] = print,
) -> Manifest:
    """Export, check and profile one model into ``out_dir`` (replaced atomically).

    Raises:
        ModelFolderError: the model is not a usable checkpoint of ``ARCHITECTURES``.
        ExportCheckFailed: a segment or the end-to-end answers disagree with PyTorch.
    """
    t_all = time.perf_counter()
    folder = resolve_model(model)
    builtin = BUILTIN_MODELS.get(str(model))
    progress(f"loading {folder}")
    ck = load_checkpoint(folder, attn_implementation="eager", image_size=options.image_size)
    if options.image_size is not None and ck.mrope is None:
        raise ModelFolderError(f"{folder}: --image-size sets a Qwen model's grid; a {ck.family} model takes its processor's crop size")
    name = builtin.name if builtin else folder.name
    tc = ck.model.config.text_config
    n_layers = tc.num_hidden_layers
    split = options.split_points or (builtin.split_points if builtin else (max(1, n_layers // 2),))
    exits = ck.exit_heads.layers if ck.exit_heads is not None else ()
    bounds = sorted({0, n_layers, *split, *exits})
    if any(not 0 <= k <= n_layers for k in bounds):
        raise ModelFolderError(f"split points {split} outside the model's {n_layers} decoder layers")
    vision_layers = ck.model.config.vision_config.num_hidden_layers
    mas_layer = options.mas_feature_layer or (builtin.mas_feature_layer if builtin else max(1, vision_layers // 4))
    template = options.prompt_template or (PROMPT_TEMPLATE if ck.mrope is None else QWEN_PROMPT_TEMPLATE)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(ck.tokenizer_json)
    placeholder = tokenizer.id_to_token(ck.model.config.image_token_id)
    if placeholder is None or placeholder not in template:
        raise ModelFolderError(
            f"{folder}: image_token_id {ck.model.config.image_token_id} is {placeholder!r} in tokenizer.json, "
            f"which the prompt template {template!r} does not contain; pass --prompt-template"
        )
    check_dataset = options.check_dataset or (builtin.dataset if builtin else "easy-vqa")
    samples = _check_samples(max(options.check_questions, 4), check_dataset)
    pixels0 = pixels_from_image(samples[0][1], ck.preprocess)
    with torch.no_grad():
        n_img = _vision_module(ck, mas_layer)(torch.from_numpy(pixels0[None]))[0].shape[1]
    info = _model_info(ck, n_img)
    model_hash = model_hash_from_checkpoint(ck)
    grid = "" if ck.mrope is None else f" (declared grid {ck.preprocess.crop_height}x{ck.preprocess.crop_width} px)"
    progress(f"{name}: {info.parameters:,} parameters, {n_layers} decoder layers, {n_img} image tokens{grid}, chunks at {bounds}")

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        segs = []
        for spec, module in _segments(ck, info, bounds, mas_layer):
            t0 = time.perf_counter()
            data = onnx_from_segment(
                module, torch_feeds(spec, info, batch=2, seq=5, past=3), spec.inputs, spec.outputs, work / spec.file, options.opset
            )
            segs.append((replace(spec, external_data=data), module))
            size = sum((work / f).stat().st_size for f in (spec.file, *data)) / 1e6
            shown = f"{size:7.2f} MB" + (f" ({', '.join(data)})" if data else "")
            progress(f"  exported {spec.name:<16} {shown}  {time.perf_counter() - t0:5.1f}s")
        (work / "tokenizer.json").write_text(ck.tokenizer_json)
        if ck.mrope is not None:
            _check_vision_against_hf(segs[0][1], ck, samples[:4], options, progress)
        checks = _check_segments(segs, work, info, ck, tokenizer, template, samples[:4], options, progress)
        segs_checked = [replace(spec, check=checks[spec.name], flops=flops_model_from_module(mod, spec, info)) for spec, mod in segs]
        created_by = {
            "msao": msao.__version__,
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "onnx": __import__("onnx").__version__,
            "onnxruntime": __import__("onnxruntime").__version__,
            "exporter": "torch.onnx.export(dynamo=False)",
            "opset": str(options.opset),
            "source": str(model) if builtin else folder.name,
        }
        manifest = Manifest(
            format_version=FORMAT_VERSION,
            name=name,
            model_hash=model_hash,
            created_by=created_by,
            model=info,
            prompt=PromptSpec(template=template, image_placeholder=placeholder),
            preprocess=ck.preprocess,
            tokenizer="tokenizer.json",
            mas_feature_layer=mas_layer,
            split_points=tuple(k for k in sorted(split) if 0 < k < n_layers),
            exit_layers=tuple(exits),
            segments=tuple(segs_checked),
            files=_file_entries(work),
        )
        _write_manifest(work, manifest)
        manifest = _check_end_to_end(work, manifest, ck, samples, options, progress)
        if options.profile_repeats:
            progress(f"  profiling segments on this machine ({options.profile_repeats} runs per point)")
            bundle = load_bundle(work)
            backend = OnnxRuntimeBackend(OrtOptions(threads=options.threads))
            manifest = replace(manifest, profiles=(profile_bundle(bundle, backend, repeats=options.profile_repeats),))
        _write_manifest(work, manifest)
        load_bundle(work)  # the bundle we ship must pass its own loader
        if out_dir.exists():
            shutil.rmtree(out_dir)
        work.rename(out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    progress(f"{name}: bundle written to {out_dir} in {time.perf_counter() - t_all:.0f}s")
    return manifest


def _file_entries(root: Path) -> tuple[FileEntry, ...]:
    files = sorted(p for p in root.iterdir() if p.is_file() and p.name != MANIFEST_NAME)
    return tuple(FileEntry(p.name, sha256_of_file(p), p.stat().st_size) for p in files)


def _write_manifest(root: Path, manifest: Manifest) -> None:
    (root / MANIFEST_NAME).write_text(json.dumps(manifest.to_dict(), indent=1) + "\n")


def _check_vision_against_hf(encoder, ck: LlavaCheckpoint, samples, options: ExportOptions, progress) -> None:
    """Qwen: our batched vision encoder vs HF's own packed ``get_image_features`` on real images."""
    worst = max(check_vision_against_hf(encoder, ck.model, pixels_from_image(rgb, ck.preprocess)) for _, rgb, _, _ in samples)
    progress(f"  checked  vision_encoder vs transformers' get_image_features: max|ours-hf| {worst:.2e}")
    if worst > options.check_atol:
        raise ExportCheckFailed(
            f"vision_encoder: max error {worst:.3e} vs transformers' get_image_features > atol {options.check_atol:.1e}; "
            f"msao's Qwen vision encoder does not match transformers {__import__('transformers').__version__}, a bug to report"
        )


def _check_segments(segs, work: Path, info: ModelInfo, ck, tokenizer, template, samples, options, progress) -> dict[str, SegmentCheck]:
    """Every segment's ONNX output vs PyTorch on recorded real feeds (prefill, decode, padded batch)."""
    import onnxruntime as ort

    specs = {spec.name: spec for spec, _ in segs}
    pipe = TorchPipeline({spec.name: mod for spec, mod in segs}, specs, info.num_layers, (info.num_kv_heads, info.head_dim), info)
    placeholder = tokenizer.id_to_token(ck.model.config.image_token_id)
    for i, (_, rgb, question, _) in enumerate(samples):
        ids = tokenizer.encode(template.format(question=question)).ids
        cut = ids.index(tokenizer.token_to_id(placeholder))
        pixels = pixels_from_image(rgb, ck.preprocess)
        pipe.run(pixels, np.asarray(ids[:cut], np.int64), np.asarray(ids[cut + 1 :], np.int64), decode_steps=2, left_pad=3 if i % 2 else 0)
    so = ort.SessionOptions()
    so.intra_op_num_threads = options.threads
    so.log_severity_level = 3
    sessions = {name: ort.InferenceSession(str(work / spec.file), so, providers=["CPUExecutionProvider"]) for name, spec in specs.items()}
    errs: dict[str, list[float]] = {name: [] for name in specs}
    scaled: dict[str, list[float]] = {name: [] for name in specs}  # error per unit of the output's scale
    means: dict[str, list[float]] = {name: [] for name in specs}
    for call in pipe.calls:
        got = sessions[call.segment].run(list(call.outputs), call.feeds)
        for g, ref in zip(got, call.outputs.values()):
            diff = np.abs(g.astype(np.float64) - ref)
            errs[call.segment].append(float(diff.max()) if diff.size else 0.0)
            scaled[call.segment].append(float(diff.max() / max(1.0, float(np.abs(ref).max()))) if diff.size else 0.0)
            means[call.segment].append(float(diff.mean()) if diff.size else 0.0)
    checks, failures = {}, []
    for name in specs:
        if not errs[name]:
            raise ExportCheckFailed(f"segment {name} was never exercised by the reference run; this is a bug in msao")
        c = SegmentCheck(max(errs[name]), float(np.mean(means[name])), len(errs[name]), options.check_atol)
        checks[name] = c
        worst = max(scaled[name])
        progress(
            f"  checked  {name:<16} max|onnx-torch| {c.max_abs_err:.2e}  mean {c.mean_abs_err:.2e}  "
            f"per unit of scale {worst:.2e}  ({c.samples} outputs)"
        )
        # fp32 outputs of magnitude M carry rounding of order M * 1e-7 per operation: the tolerance is
        # absolute below magnitude 1 and relative above it (|onnx - torch| <= atol * max(1, |torch|))
        if worst > options.check_atol:
            failures.append(
                f"{name}: max error {worst:.3e} per unit of output scale > atol {options.check_atol:.1e} "
                f"(max abs {c.max_abs_err:.3e}, mean {c.mean_abs_err:.3e})"
            )
    if failures:
        raise ExportCheckFailed("exported segments disagree with PyTorch:\n  - " + "\n  - ".join(failures))
    return checks


def _check_end_to_end(work: Path, manifest: Manifest, ck, samples, options, progress) -> Manifest:
    """Greedy answers from the ONNX files alone must equal HF ``generate``'s, token for token."""
    gen = Generator(load_bundle(work), OnnxRuntimeBackend(OrtOptions(threads=options.threads)))
    info = manifest.model
    n = options.check_questions
    same, correct, mismatches = 0, 0, []
    bar = progress_bar(n, "end-to-end check", "q")
    for _, rgb, question, answer in samples[:n]:
        pixels = pixels_from_image(rgb, manifest.preprocess)
        got = gen.generate(gen.encode_image(pixels), question, max_new_tokens=options.max_new_tokens)
        prefix, suffix = gen.prompt_ids(question)
        ids = np.concatenate([prefix, np.full(info.image_tokens, info.image_token_id, np.int64), suffix])
        vision = None if info.mrope is None else hf_vision_inputs(pixels, info.mrope, ids, info.image_token_id)
        ref = hf_greedy_answer(ck.model, pixels, ids, list(info.eos_token_ids), info.pad_token_id, options.max_new_tokens, vision)
        if list(got.token_ids) == ref:
            same += 1
        else:
            mismatches.append(f"{question!r}: onnx {list(got.token_ids)} vs torch {ref}")
        correct += got.text == answer
        bar.update()
        bar.set_postfix_str(f"identical {same}", refresh=False)
    bar.close()
    gen.close()
    progress(f"  end-to-end: {same}/{n} answers identical to PyTorch generate; ONNX accuracy on them {correct / n:.3f}")
    if mismatches:
        raise ExportCheckFailed(f"{len(mismatches)}/{n} greedy answers differ from PyTorch:\n  - " + "\n  - ".join(mismatches[:10]))
    return replace(manifest, checks=BundleChecks(questions=n, identical_answers=same, accuracy_onnx=round(correct / n, 4)))
