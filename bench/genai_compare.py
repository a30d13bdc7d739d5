"""msao's decoder segments vs onnxruntime-genai on the same weights: prefill, per-token decode, peak memory.

    python bench/genai_compare.py --bundle bundles/qwen2-vl-2b-widths --model build/real-widths/qwen2-vl-2b-widths \
        [--prompt-tokens 520] [--new-tokens 64] [--threads 2] [--rounds 3] [--out FILE]

The model is a Qwen2-VL checkpoint at Qwen2-VL-2B's widths (``bench/real_width_models.py``;
its decoder has Qwen2-1.5B's widths). msao answers from its exported bundle (text embedding,
two decoder chunks, LM head: four ONNX Runtime sessions per step, the KV cache in preallocated
buffers). onnxruntime-genai builds its own ONNX model with its model builder from the same
weights, saved as a ``Qwen2ForCausalLM`` folder (the text part of the checkpoint, renamed), in
fp32 for the CPU, with ``prune_lm_head`` (last-token logits at prefill, as msao computes them).
A text-only prompt: M-RoPE with equal (t, h, w) ids is Qwen2's 1-D RoPE, so both must generate
the same tokens, and the bench checks that they do.

Each side runs in its own process (peak RSS is that process's VmHWM, the model loaded and
run), alternating, ``--rounds`` times; each process times ``--repeats`` generations after one
warm-up. Reported: medians over every timed generation of a side. Same threads for both
(ONNX Runtime intra-op threads; inter-op 1). A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def _prompt_ids(bundle: Path, prompt_tokens: int) -> tuple[list[int], str]:
    """msao's prompt ids (its template around a question of filler words) of about ``prompt_tokens`` ids, and that question."""
    from tokenizers import Tokenizer

    from msao.engines.bundle import load_bundle

    b = load_bundle(bundle)
    tok = Tokenizer.from_str(b.read_verified(b.manifest.tokenizer).decode())
    template = b.manifest.prompt.template.replace(b.manifest.prompt.image_placeholder, "")
    overhead = len(tok.encode(template.format(question="")).ids)
    rng = np.random.default_rng(0)
    words = " ".join(f"w{i}" for i in rng.integers(1000, b.manifest.model.vocab_size, prompt_tokens - overhead))
    return tok.encode(template.format(question=words)).ids, words


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def run_msao(args) -> dict:
    from msao.engines.bundle import load_bundle
    from msao.engines.generation import Generator, text_only_encoding
    from msao.engines.onnxruntime_backend import OnnxRuntimeBackend, OrtOptions

    _, words = _prompt_ids(args.bundle, args.prompt_tokens)
    gen = Generator(load_bundle(args.bundle), OnnxRuntimeBackend(OrtOptions(threads=args.threads)))
    image = text_only_encoding(gen.info.hidden_size)
    prefill, decode, tokens = [], [], None
    for i in range(args.repeats + 1):
        a = gen.generate(image, words, max_new_tokens=args.new_tokens)
        if i:  # the first run warms the sessions up
            prefill.append(a.timings.embed_ms + a.timings.prefill_ms)
            decode.append(a.timings.decode_ms / max(1, len(a.token_ids) - 1))
        tokens = list(a.token_ids)
    step = gen.runners["text_embed"]
    one = {"input_ids": np.asarray([[5]], np.int64)}
    times = []
    for _ in range(50):
        t0 = time.perf_counter()
        step.infer(one)
        times.append((time.perf_counter() - t0) * 1e3)
    prompt = len(gen.prompt_ids(words)[0]) + len(gen.prompt_ids(words)[1])
    return {"prefill_ms": prefill, "decode_ms_per_token": decode, "tokens": tokens, "prompt_tokens": prompt,
            "peak_rss_bytes": _peak_rss(), "session_call_ms": statistics.median(times), "sessions_per_step": 2 + len(gen.bundle.manifest.decoder_chunks())}  # fmt: skip


def run_genai(args) -> dict:
    import onnxruntime_genai as og

    ids, _ = _prompt_ids(args.bundle, args.prompt_tokens)
    model = og.Model(str(args.genai_dir))
    prefill, decode, tokens = [], [], None
    for i in range(args.repeats + 1):
        params = og.GeneratorParams(model)
        total = len(ids) + args.new_tokens
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(ids)
        t1 = time.perf_counter()
        out = []
        while not gen.is_done() and len(out) < args.new_tokens:
            gen.generate_next_token()
            out.append(int(gen.get_next_tokens()[0]))
        t2 = time.perf_counter()
        if i:
            prefill.append((t1 - t0) * 1e3)
            decode.append((t2 - t1) * 1e3 / max(1, len(out) - 1))
        tokens = out
        del gen
    return {
        "prefill_ms": prefill,
        "decode_ms_per_token": decode,
        "tokens": tokens,
        "prompt_tokens": len(ids),
        "peak_rss_bytes": _peak_rss(),
    }


def build_genai_model(model_dir: Path, out: Path, threads: int) -> Path:
    """The checkpoint's text decoder as a ``Qwen2ForCausalLM`` folder, then onnxruntime-genai's model builder (fp32, CPU)."""
    if (out / "genai_config.json").exists():
        return out
    import torch
    from safetensors.torch import load_file
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = json.loads((model_dir / "config.json").read_text())
    text = cfg["text_config"]
    rope = text.get("rope_parameters") or {}
    qcfg = Qwen2Config(
        hidden_size=text["hidden_size"], intermediate_size=text["intermediate_size"], num_hidden_layers=text["num_hidden_layers"],
        num_attention_heads=text["num_attention_heads"], num_key_value_heads=text["num_key_value_heads"], vocab_size=text["vocab_size"],
        max_position_embeddings=text["max_position_embeddings"], rms_norm_eps=text["rms_norm_eps"], rope_theta=rope.get("rope_theta", 1e6),
        tie_word_embeddings=False, eos_token_id=text["eos_token_id"], pad_token_id=text.get("pad_token_id"), bos_token_id=None,
    )  # fmt: skip
    state = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(str(f)))
    renamed = {}  # transformers saves Qwen2-VL's decoder as model.* (older layout) or model.language_model.* (in memory)
    for k, v in state.items():
        if k.startswith("model.language_model."):
            renamed["model." + k[len("model.language_model.") :]] = v
        elif k.startswith("model.") and not k.startswith("model.visual."):
            renamed[k] = v
    renamed["lm_head.weight"] = state["lm_head.weight"]
    hf_dir = out.parent / f"{out.name}-hf"
    with torch.device("meta"):
        model = Qwen2ForCausalLM(qcfg)
    model.load_state_dict(renamed, strict=True, assign=True)
    model.save_pretrained(hf_dir)
    (hf_dir / "tokenizer.json").write_bytes((model_dir / "tokenizer.json").read_bytes())
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out), "-p", "fp32", "-e", "cpu",
           "-c", str(out.parent / "genai-cache"), "--extra_options", "prune_lm_head=true"]  # fmt: skip
    subprocess.run(cmd, check=True)
    gc = json.loads((out / "genai_config.json").read_text())
    gc["model"]["decoder"].setdefault("session_options", {}).update(intra_op_num_threads=threads, inter_op_num_threads=1)
    (out / "genai_config.json").write_text(json.dumps(gc, indent=2))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--model", type=Path, required=True, help="the HF folder the bundle was exported from")
    p.add_argument("--genai-dir", type=Path, default=Path("build/real-widths/genai-qwen2"))
    p.add_argument("--prompt-tokens", type=int, default=520)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("bench/results/genai-compare.json"))
    p.add_argument("--side", choices=("msao", "genai"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        print(json.dumps(run_msao(args) if args.side == "msao" else run_genai(args)))
        return
    t0 = time.perf_counter()
    build_genai_model(args.model, args.genai_dir, args.threads)
    build_s = time.perf_counter() - t0
    runs: dict[str, list[dict]] = {"msao": [], "genai": []}
    base = [sys.executable, __file__, "--bundle", str(args.bundle), "--model", str(args.model), "--genai-dir", str(args.genai_dir),
            "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens), "--threads", str(args.threads),
            "--repeats", str(args.repeats)]  # fmt: skip
    for r in range(args.rounds):
        for side in ("msao", "genai") if r % 2 == 0 else ("genai", "msao"):
            out = subprocess.run(
                [*base, "--side", side], check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
            )
            runs[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} {side}: prefill {statistics.median(runs[side][-1]['prefill_ms']):.0f} ms, "
                  f"decode {statistics.median(runs[side][-1]['decode_ms_per_token']):.1f} ms/token", flush=True)  # fmt: skip

    def med(side: str, key: str) -> float:
        return statistics.median(x for run in runs[side] for x in run[key])

    summary = {
        side: {
            "prefill_ms": med(side, "prefill_ms"),
            "decode_ms_per_token": med(side, "decode_ms_per_token"),
            "tokens_per_s": 1e3 / med(side, "decode_ms_per_token"),
            "peak_rss_mb": max(run["peak_rss_bytes"] for run in runs[side]) / 2**20,
            "prompt_tokens": runs[side][0]["prompt_tokens"],
        }
        for side in runs
    }
    m = runs["msao"][0]
    summary["ratio_msao_over_genai"] = {
        k: summary["msao"][k] / summary["genai"][k] for k in ("prefill_ms", "decode_ms_per_token", "peak_rss_mb")
    }
    summary["same_tokens"] = m["tokens"] == runs["genai"][0]["tokens"]
    summary["first_difference"] = next((i for i, (a, b) in enumerate(zip(m["tokens"], runs["genai"][0]["tokens"])) if a != b), None)
    summary["msao_session_call_ms"] = m["session_call_ms"]
    summary["msao_sessions_per_step"] = m["sessions_per_step"]
    summary["setup"] = {"threads": args.threads, "new_tokens": args.new_tokens, "rounds": args.rounds, "repeats": args.repeats,
                        "genai_build_s": round(build_s, 1), "onnxruntime_genai": __import__("onnxruntime_genai").__version__,
                        "onnxruntime": __import__("onnxruntime").__version__, "cpus": os.cpu_count()}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": summary, "runs": runs}, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
