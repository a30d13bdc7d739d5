"""Training recipe of the built-in easy-VQA models (CPU, deterministic, a bounded number of steps).

Two stages. Stage 1 trains the vision tower alone to say, for every image token, whether it
shows the shape and which shape and colour it is (labels computed from the training pixels:
foreground = far from the border colour; shape from the bounding-box fill ratio, triangle ≈ 0.5,
circle ≈ 0.8, rectangle ≈ 1; colour = nearest of the 8 easy-VQA colours). Stage 2 trains the
whole LLaVA on the VQA answers, keeping those per-token losses, plus a "match" probe on yes/no
questions (does the shape or colour the question names match the image, before negation?).
Without this, tiny decoders leave shape at chance for a long time (measured, docs/models.md).
The auxiliary heads are dropped after training: the shipped model is a plain LLaVA.

Two more things the rest of msao relies on are trained in:

* random visual-token dropout: a share of the batches keeps only a random subset of the image
  tokens (original position ids kept, at least one token showing the shape), so the decoder
  answers from MAS-pruned token sets;
* early-exit heads after chosen decoder layers, trained jointly with the final head.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from msao.datasets.easyvqa import EasyVqaSplit, load_easy_vqa
from msao.engines.images import ImagePreprocess, pixels_from_image
from msao.export.builtin import PROMPT_TEMPLATE, BuiltinSpec, tokenizer_for_easy_vqa
from msao.export.checkpoint import ExitHeads, llava_from_spec, save_checkpoint
from msao.export.segments import DecoderChunk, LmHead, TextEmbed, VisionEncoder

__all__ = ["aux_labels_from_images", "RECIPES", "TrainOptions", "TrainReport", "train_builtin"]

log = logging.getLogger(__name__)

SHAPES = ("circle", "rectangle", "triangle")
COLOURS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")
_COLOUR_RGB = np.array(
    [[36, 36, 36], [33, 33, 253], [174, 65, 65], [138, 138, 138], [33, 253, 33], [253, 33, 33], [26, 140, 141], [254, 254, 21]],
    np.float32,
)  # measured means of each easy-VQA colour; nearest wins


@dataclass(frozen=True)
class TrainOptions:
    """Knobs of the recipe; defaults are the settings the committed checkpoints were trained with."""

    vision_steps: int = 500  # stage 1: vision tower + per-token aux classifier only
    vision_batch_size: int = 128
    steps: int = 3000  # stage 2: the whole model on VQA
    batch_size: int = 64  # questions per step
    questions_per_image: int = 1  # >1 shares one image encoding between questions (faster, measured less stable)
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.05
    token_dropout_share: float = 0.5  # share of batches with a random keep-set
    min_keep_ratio: float = 0.1
    exit_weight: float = 0.5
    aux_weight: float = 0.5  # shape/colour classifier on image tokens + yes/no "match" probe
    match_on_exits: bool = True  # the "match" probe also after each exit layer (else after the last layer only)
    balance_yes_no: bool = True  # sample yes/no questions with as many attribute matches as mismatches
    seed: int = 0
    threads: int = 2
    eval_every: int = 500
    eval_questions: int = 2000


# The edge recipe stops early on purpose: trained on, the same 2-layer model reaches ~99.5 % by
# step 1,400 (docs/models.md), as does the cloud model; easy-VQA saturates, and a budget edge
# model keeps the honest gap that draft/verify and the scheduler are there to exploit.
RECIPES: dict[str, TrainOptions] = {
    "msao-tiny-edge": TrainOptions(vision_steps=400, steps=500, exit_weight=0.1, match_on_exits=False, balance_yes_no=False),
    "msao-tiny-cloud": TrainOptions(vision_steps=500, steps=4000, exit_weight=0.1, match_on_exits=False),
}


@dataclass(frozen=True)
class TrainReport:
    name: str
    steps: int
    seconds: float
    params: int
    first_loss: float
    final_loss: float
    eval_accuracy: dict[str, float]  # teacher-forced first-token accuracy on a test subset, per head


def _background(a: np.ndarray) -> np.ndarray:
    """Background colour per image (N, 3): the median of the border pixels of (N, H, W, 3)."""
    border = np.concatenate([a[:, 0], a[:, -1], a[:, :, 0], a[:, :, -1]], axis=1)  # (N, 4W, 3)
    return np.median(border, axis=1)


def foreground_from_images(images: np.ndarray) -> np.ndarray:
    """Pixels of the shape: far from the background colour."""
    a = images.astype(np.int32)  # (N, H, W, 3)
    return np.abs(a - _background(a)[:, None, None]).sum(-1) > 60  # (N, H, W)


def aux_labels_from_images(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Shape and colour class per easy-VQA image, computed from pixels (training aid only).

    Returns:
        (shape_ids, colour_ids), int64 (N,), indexing ``SHAPES`` and ``COLOURS``.
    """
    a = images.astype(np.int32)
    fg = foreground_from_images(images)
    bg = _background(a)
    shape_ids = np.empty(len(a), np.int64)
    colour_ids = np.empty(len(a), np.int64)
    for i, m in enumerate(fg):
        ys, xs = np.nonzero(m)
        fill = m.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
        shape_ids[i] = 2 if fill < 0.7 else (0 if fill < 0.915 else 1)
        # The outline is anti-aliased into the background, so a plain mean drifts (a small teal
        # triangle on white averages to gray): use the median of the half farthest from it.
        px = a[i][m]
        dist = np.abs(px - bg[i]).sum(1)
        colour = np.median(px[dist >= np.median(dist)], axis=0)
        colour_ids[i] = int(np.argmin(((_COLOUR_RGB - colour) ** 2).sum(1)))
    return shape_ids, colour_ids


class _Batcher:
    """Turns easy-VQA questions into prompt/answer tensors once; samples batches from them."""

    def __init__(self, split: EasyVqaSplit, tokenizer, preprocess: ImagePreprocess, patch: int):
        prompt = tokenizer.encode(PROMPT_TEMPLATE.format(question="")).ids
        image_id = tokenizer.token_to_id("<image>")
        cut = prompt.index(image_id)
        self.prefix = np.asarray(prompt[:cut], np.int64)  # [<s>, user, :]
        pad, eos = tokenizer.token_to_id("<pad>"), tokenizer.token_to_id("</s>")
        tails = []
        for q, a in zip(split.questions, split.answers):
            ids = tokenizer.encode(PROMPT_TEMPLATE.format(question=q)).ids
            tails.append(ids[ids.index(image_id) + 1 :] + [tokenizer.token_to_id(a)])
        width = max(map(len, tails))
        self.tail = np.full((len(tails), width), pad, np.int64)
        self.tail_len = np.asarray([len(t) for t in tails], np.int64)
        for i, t in enumerate(tails):
            self.tail[i, : len(t)] = t
        self.answer = self.tail[np.arange(len(tails)), self.tail_len - 1]
        self.eos = eos
        self.answer_kinds = {
            "shape": [tokenizer.token_to_id(w) for w in SHAPES],
            "colour": [tokenizer.token_to_id(w) for w in COLOURS],
            "yes/no": [tokenizer.token_to_id(w) for w in ("yes", "no")],
        }
        self.image_ids = split.image_ids
        # the model's own preprocessing (resize to its input size, normalise), as at inference
        self.pixels = np.stack([pixels_from_image(img, preprocess) for img in split.images])  # (N, 3, H, W)
        self.shape_ids, self.colour_ids = aux_labels_from_images(split.images)
        fg = foreground_from_images(split.images)
        n, h, w = fg.shape
        grid = preprocess.crop_height // patch  # tokens per side; each covers h // grid source pixels
        cell = h // grid
        share = fg.reshape(n, grid, cell, grid, cell).mean(axis=(2, 4))  # (N, gh, gw)
        self.token_fg = share > 0.1  # image tokens that show part of the shape
        # yes/no questions: does the named shape/colour match the image (before any negation)?
        negated = np.asarray([bool({"not", "no"} & set(q.replace("?", " ").split())) for q in split.questions])
        yes = np.asarray([a == "yes" for a in split.answers])
        is_yes_no = np.asarray([a in ("yes", "no") for a in split.answers])
        self.match = np.where(is_yes_no, (yes != negated).astype(np.float32), -1.0).astype(np.float32)
        # Sampling weights: within yes/no questions about a colour (or a shape), as many whose named
        # attribute matches the image as ones where it does not. Naturally 1 in 8 colour questions
        # match (1 in 3 shape questions), and a tiny decoder then learns the prior ("is there not
        # a red shape?" -> yes) instead of the comparison: measured, docs/models.md.
        names_colour = np.asarray([bool(set(COLOURS) & set(q.replace("?", " ").split())) for q in split.questions])
        weights = np.ones(len(split.questions))
        for kind in (names_colour, ~names_colour):
            group = is_yes_no & kind
            for value in (0.0, 1.0):
                sel = group & (self.match == value)
                if sel.any():
                    weights[sel] = 0.5 * group.sum() / sel.sum()
        self.row_weights = weights / weights.sum()
        order = np.argsort(self.image_ids, kind="stable")
        bounds = np.searchsorted(self.image_ids[order], np.arange(len(split.images) + 1))
        self.rows_of_image = [order[bounds[i] : bounds[i + 1]] for i in range(len(split.images))]

    def sample_rows(self, rng: np.random.Generator, batch: int, per_image: int, balanced: bool = True) -> np.ndarray:
        """``batch`` question rows: batch/per_image drawn by ``row_weights``, each with per_image - 1 more of its image's questions."""
        first = rng.choice(len(self.row_weights), max(1, batch // per_image), p=self.row_weights if balanced else None)
        if per_image == 1:
            return first
        more = [rng.choice(self.rows_of_image[self.image_ids[r]], per_image - 1) for r in first]
        return np.concatenate([np.concatenate([[r], m]) for r, m in zip(first, more)])

    def images_batch(self, img: np.ndarray, flip: np.ndarray | None = None) -> dict[str, torch.Tensor]:
        """Pixels and aux labels of images ``img``; a horizontal flip changes no easy-VQA answer."""
        px, fg = self.pixels[img], self.token_fg[img]  # (B, 3, H, W), (B, gh, gw)
        if flip is not None:
            px = np.where(flip[:, None, None, None], px[..., ::-1], px)
            fg = np.where(flip[:, None, None], fg[..., ::-1], fg)
        return {
            "pixels": torch.from_numpy(np.ascontiguousarray(px)),
            "token_fg": torch.from_numpy(np.ascontiguousarray(fg).reshape(len(img), -1)),
            "shape": torch.from_numpy(self.shape_ids[img]),
            "colour": torch.from_numpy(self.colour_ids[img]),
        }

    def batch(self, rows: np.ndarray, rng: np.random.Generator | None = None) -> dict[str, torch.Tensor]:
        """Question rows: each distinct image once (randomly flipped with ``rng``), prompt tails, answers."""
        images, image_index = np.unique(self.image_ids[rows], return_inverse=True)
        flip = None if rng is None else rng.random(len(images)) < 0.5
        return {
            **self.images_batch(images, flip),
            "image_index": torch.from_numpy(image_index.astype(np.int64)),
            "match": torch.from_numpy(self.match[rows]),
            "tail": torch.from_numpy(self.tail[rows]),
            "tail_len": torch.from_numpy(self.tail_len[rows]),
            "answer": torch.from_numpy(self.answer[rows]),
        }


class _Trainee(nn.Module):
    """The model as the recipe sees it: segments chained, exits tapped, aux classifier attached."""

    def __init__(self, spec: BuiltinSpec, vocab_size: int):
        super().__init__()
        self.llava = llava_from_spec(spec, vocab_size)
        self.spec = spec
        self.vision = VisionEncoder(self.llava, spec.mas_feature_layer)
        self.embed = TextEmbed(self.llava)
        bounds = sorted({0, *spec.exit_layers, spec.text_layers})
        self.chunks = nn.ModuleList(DecoderChunk(self.llava, a, b) for a, b in zip(bounds, bounds[1:]))
        self.head = LmHead(self.llava)
        self.exits = ExitHeads(spec.exit_layers, spec.text_hidden, vocab_size)
        self.foreground = nn.Linear(spec.vision_hidden, 1)  # per token: does it show the shape?
        self.attribute_ids: torch.Tensor  # token ids of SHAPES then COLOURS, set by train_builtin
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.match = nn.ModuleDict({str(k): nn.Linear(spec.text_hidden, 1) for k in (*spec.exit_layers, spec.text_layers)})
        cfg = self.llava.config.text_config
        self.kv_shape = (cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads)

    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image tokens (B, N, D) and per-token auxiliary logits (B, N, 1 + 3 + 8).

        Logit 0 (foreground) reads the vision feature; the shape and colour logits are cosine
        similarities between the *projected* token and the model's own word embeddings of the
        shape and colour names. So each token that shows the shape carries its evidence where
        the decoder reads it, and in the space of the question's words: MAS can then measure a
        question's relevance to a token as a plain cosine (docs/mas.md).
        """
        features, _ = self.vision.select(pixels)  # (B, N, Dv)
        tokens = self.vision.projector(features)  # (B, N, D)
        words = self.embed(self.attribute_ids)  # (3 + 8, D)
        cos = nn.functional.normalize(tokens, dim=-1) @ nn.functional.normalize(words, dim=-1).T  # (B, N, 11)
        return tokens, torch.cat([self.foreground(features), self.logit_scale.exp() * cos], dim=-1)

    def forward(self, b: dict[str, torch.Tensor], prefix: torch.Tensor, keep: int, gen: torch.Generator):
        tokens, aux_logits = self.encode(b["pixels"])  # (B_img, N, D), (B_img, N, 12)
        tokens = tokens[b["image_index"]]  # (B_img, N, D) -> (B, N, D): questions share encodings
        bsz, n, _ = tokens.shape
        lp = prefix.shape[0]
        if keep < n:  # (B, N, D) -> (B, K, D), positions of kept tokens preserved
            # Random tokens, but always one that shows the shape: with the object dropped
            # entirely, "is there a red shape? yes" would teach the model a false answer.
            score = torch.rand(bsz, n, generator=gen)
            fg = b["token_fg"][b["image_index"]]  # (B, N)
            forced = torch.where(fg, torch.rand(bsz, n, generator=gen), torch.full_like(score, -1.0)).argmax(dim=1)
            score[torch.arange(bsz), forced] = 2.0
            idx = score.argsort(dim=1, descending=True)[:, :keep].sort(dim=1).values
            tokens = tokens.gather(1, idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        else:
            idx = torch.arange(n).expand(bsz, n)
        tail = b["tail"]
        x = torch.cat([self.embed(prefix).expand(bsz, -1, -1), tokens, self.embed(tail)], dim=1)
        pos = torch.cat([torch.arange(lp).expand(bsz, lp), lp + idx, (lp + n + torch.arange(tail.shape[1])).expand(bsz, -1)], dim=1)
        mask = torch.ones(bsz, x.shape[1], dtype=torch.int64)
        ans_pos = lp + idx.shape[1] + b["tail_len"] - 2  # last prompt token predicts the answer
        at = torch.stack([ans_pos, ans_pos + 1], dim=1)  # (B, 2): answer, then </s>
        hidden, taps = x, {}
        empty = torch.zeros(bsz, *self.kv_shape[:1], 0, self.kv_shape[1])
        for chunk in self.chunks:
            hidden = chunk(hidden, pos, mask, *([empty] * (2 * (chunk.end - chunk.start))))[0]
            taps[chunk.end] = hidden
        pick = lambda h: h.gather(1, at.unsqueeze(-1).expand(-1, -1, h.shape[-1]))  # noqa: E731
        logits = {"final": self.head(pick(hidden))}
        for k in self.spec.exit_layers:
            logits[f"exit@{k}"] = self.exits[k](pick(taps[k]))
        match = {k: self.match[str(k)](pick(h)[:, 0]).squeeze(-1) for k, h in taps.items() if str(k) in self.match}
        return logits, aux_logits, match


def _evaluate(model: _Trainee, data: _Batcher, prefix: torch.Tensor, rows: np.ndarray) -> dict[str, float]:
    model.eval()
    hits: dict[str, int] = {}
    totals: dict[str, int] = {}
    kinds = {k: torch.as_tensor(v) for k, v in data.answer_kinds.items()}
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for s in range(0, len(rows), 256):
            b = data.batch(rows[s : s + 256])
            logits, _, _ = model(b, prefix, keep=10**9, gen=gen)
            for name, lg in logits.items():
                right = lg[:, 0].argmax(-1) == b["answer"]
                hits[name] = hits.get(name, 0) + int(right.sum())
                if name == "final":
                    for kind, ids in kinds.items():
                        sel = torch.isin(b["answer"], ids)
                        hits[f"final/{kind}"] = hits.get(f"final/{kind}", 0) + int(right[sel].sum())
                        totals[f"final/{kind}"] = totals.get(f"final/{kind}", 0) + int(sel.sum())
    model.train()
    return {k: v / totals.get(k, len(rows)) for k, v in hits.items()}


def _pretrain_vision(model: _Trainee, train: _Batcher, options: TrainOptions, rng, aux_loss, progress) -> None:
    """Stage 1: teach the vision tower and projector shape and colour per token (cheap, no decoder).

    Joint VQA training alone leaves shape at chance for a long time; a few hundred steps of
    direct per-token classification against the word embeddings make every image token that
    shows the shape carry its shape and colour, in the space of the question's words.
    """
    if options.vision_steps <= 0:
        return
    params = [*model.vision.parameters(), *model.foreground.parameters()]  # tower + projector + fg head
    opt = torch.optim.AdamW(
        [
            {"params": params, "weight_decay": options.weight_decay},
            # the word embeddings (only the attribute rows get gradients) and the scale: no decay
            {"params": [*model.embed.parameters(), model.logit_scale], "weight_decay": 0.0},
        ],
        lr=options.lr,
    )
    n_images = len(train.pixels)
    t0 = time.perf_counter()
    for step in range(options.vision_steps):
        warm = min(1.0, (step + 1) / options.warmup_steps)
        for g in opt.param_groups:
            g["lr"] = options.lr * warm * 0.5 * (1 + math.cos(math.pi * step / options.vision_steps))
        img = rng.integers(0, n_images, options.vision_batch_size)
        b = train.images_batch(img, flip=rng.random(len(img)) < 0.5)
        _, aux = model.encode(b["pixels"])
        loss = aux_loss(aux, b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % options.eval_every == 0 or step + 1 == options.vision_steps:
            progress(
                f"[{model.spec.name}] vision step {step + 1}/{options.vision_steps} shape+colour loss {float(loss.detach()):.4f} ({time.perf_counter() - t0:.0f}s)"
            )


def train_builtin(
    spec: BuiltinSpec,
    out_dir: Path,
    options: TrainOptions = TrainOptions(),
    progress: Callable[[str], None] = print,
) -> TrainReport:
    """Train one built-in model on easy-VQA train and write its checkpoint to ``out_dir``."""
    torch.manual_seed(options.seed)
    torch.set_num_threads(options.threads)
    rng = np.random.default_rng(options.seed)
    gen = torch.Generator().manual_seed(options.seed)
    tokenizer = tokenizer_for_easy_vqa()
    preprocess = ImagePreprocess(shortest_edge=spec.image_size, crop_height=spec.image_size, crop_width=spec.image_size)
    train = _Batcher(load_easy_vqa("train"), tokenizer, preprocess, spec.patch_size)
    test = _Batcher(load_easy_vqa("test"), tokenizer, preprocess, spec.patch_size)
    eval_rows = np.random.default_rng(1).permutation(len(test.answer))[: options.eval_questions]
    model = _Trainee(spec, tokenizer.get_vocab_size())
    model.attribute_ids = torch.tensor([tokenizer.token_to_id(w) for w in (*SHAPES, *COLOURS)])
    model.train()
    n_params = sum(p.numel() for p in model.llava.parameters())
    prefix = torch.from_numpy(train.prefix)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": options.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=options.lr,
        betas=(0.9, 0.98),
    )

    def lr_at(step: int) -> float:
        if step < options.warmup_steps:
            return options.lr * (step + 1) / options.warmup_steps
        t = (step - options.warmup_steps) / max(1, options.steps - options.warmup_steps)
        return options.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t)))

    ce = nn.CrossEntropyLoss()
    bce = nn.BCEWithLogitsLoss()

    def aux_loss(aux: torch.Tensor, b: dict[str, torch.Tensor]) -> torch.Tensor:
        fg = b["token_fg"]  # (B, N) bool
        n_per_image = fg.sum(1)
        shape = b["shape"].repeat_interleave(n_per_image)
        colour = b["colour"].repeat_interleave(n_per_image)
        on = aux[fg]  # (F, 12): foreground tokens only
        return bce(aux[..., 0], fg.float()) + ce(on[:, 1 : 1 + len(SHAPES)], shape) + ce(on[:, 1 + len(SHAPES) :], colour)

    t0 = time.perf_counter()
    _pretrain_vision(model, train, options, rng, aux_loss, progress)
    n_tokens = (spec.image_size // spec.patch_size) ** 2
    loss_ema = first_loss = float("nan")
    acc: dict[str, float] = {}
    for step in range(options.steps):
        b = train.batch(train.sample_rows(rng, options.batch_size, options.questions_per_image, options.balance_yes_no), rng)
        keep = n_tokens
        if rng.random() < options.token_dropout_share:
            keep = int(rng.integers(max(1, round(options.min_keep_ratio * n_tokens)), n_tokens + 1))
        logits, aux, match = model(b, prefix, keep=keep, gen=gen)
        target = torch.stack([b["answer"], torch.full_like(b["answer"], train.eos)], dim=1)
        loss = ce(logits["final"].flatten(0, 1), target.flatten())
        for k in spec.exit_layers:
            loss = loss + options.exit_weight * ce(logits[f"exit@{k}"].flatten(0, 1), target.flatten())
        is_yes_no = b["match"] >= 0
        match_loss = sum(
            bce(m[is_yes_no], b["match"][is_yes_no]) for k, m in match.items() if options.match_on_exits or k == spec.text_layers
        )
        loss = loss + options.aux_weight * (aux_loss(aux, b) + match_loss)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_val = float(loss.detach())
        first_loss = loss_val if step == 0 else first_loss
        loss_ema = loss_val if math.isnan(loss_ema) else 0.98 * loss_ema + 0.02 * loss_val
        if (step + 1) % options.eval_every == 0 or step + 1 == options.steps:
            acc = _evaluate(model, test, prefix, eval_rows)
            el = time.perf_counter() - t0
            eta = el / (step + 1) * (options.steps - step - 1)
            accs = " ".join(f"{k}={v:.3f}" for k, v in acc.items())
            progress(f"[{spec.name}] step {step + 1}/{options.steps} loss {loss_ema:.4f} test-subset {accs} ({el:.0f}s, eta {eta:.0f}s)")
    seconds = time.perf_counter() - t0
    model.eval()
    save_checkpoint(out_dir, model.llava, tokenizer, preprocess, model.exits)
    report = TrainReport(spec.name, options.steps, round(seconds, 1), n_params, round(first_loss, 5), round(loss_ema, 5), acc)
    (out_dir / "train_report.json").write_text(
        json.dumps({"report": asdict(report), "options": asdict(options), "spec": asdict(spec)}, indent=2) + "\n"
    )
    return report
