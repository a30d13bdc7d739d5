"""Procedural multi-object VQA scenes: most image tokens are irrelevant to the question.

Each image is 192x192 RGB with 3-7 coloured shapes on a muted, seeded texture; each question
is about one or two of them (or about a kind of object), in a fixed template, so the answer
vocabulary is closed and some answers take several words ("small red triangle", "top left").
Everything is drawn from numpy Generators with fixed seeds and rasterized in numpy (Pillow only
encodes PNG), so a split has the same pixels and questions on every machine. Knows nothing of
models or tokenizers.

Why 192 px: the built-in models use 16 px patches, so an image is 12x12 = 144 tokens, the
fewest the workload's issue allows and the cheapest to train on a 2-core CPU; an object
(18-48 px) touches 2-16 of those 144 patches (8.6 on average), so a question's support covers
about 6 % of the tokens (docs/scenes.md) and a token-selection method has something to show.
On easy-VQA one shape fills a 64x64 image: keeping a random 25 % of the tokens answers as well
as any selection does.

Bookkeeping makes every answer readable from the pixels: objects are drawn in order (later
ones cover earlier ones); an object is *visible* if at least ``VISIBLE_MIN`` of its pixels stay
uncovered, and no question is asked whose answer would depend on an object that is not.

    scene: texture + objects in draw order --> pixels (rendered on demand)
                    |
                    +--> questions, answers, families, supports (object indices)

Memory: a split keeps only the object lists; pixels and PNG bytes are rendered on demand from
the scene (about 2 ms per image, 11 ms more for PNG), since the 4,000 training images would be
440 MB as arrays.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache, partial
from typing import NamedTuple

import numpy as np

from msao.errors import ConfigError

__all__ = [
    "ANSWER_WORDS",
    "COLOURS",
    "COUNT_WORDS",
    "IMAGE_PX",
    "PATCH_PX",
    "QUADRANTS",
    "QUESTIONS_PER_IMAGE",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "Background",
    "QuestionFamily",
    "Scene",
    "SceneFrame",
    "SceneImages",
    "SceneObject",
    "ScenePngs",
    "SceneStream",
    "SceneStreamOptions",
    "ScenesSplit",
    "answer_vocabulary",
    "image_from_scene",
    "load_scenes",
    "load_training_pool",
    "owner_map",
    "scene_stream",
    "support_patches",
]

IMAGE_PX = 192
PATCH_PX = 16
MIN_OBJECTS, MAX_OBJECTS = 3, 7
QUESTIONS_PER_IMAGE = 5
VISIBLE_MIN = 0.8  # share of an object's pixels that must stay uncovered for questions about it
QUADRANT_MARGIN_PX = 6  # a centre this close to a midline has no clear quadrant
RELATION_GAP_PX = 16  # centres must be at least one patch apart on the asked axis

COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (25, 25, 25),
    "blue": (35, 75, 225),
    "green": (35, 175, 60),
    "orange": (245, 140, 25),
    "purple": (145, 50, 190),
    "red": (220, 35, 35),
    "white": (245, 245, 245),
    "yellow": (240, 215, 35),
}
SHAPES = ("circle", "cross", "diamond", "square", "star", "triangle")
SIZES: dict[str, tuple[int, int]] = {"large": (34, 48), "small": (18, 26)}  # extent in px, inclusive
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
COUNT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven")
_PLURALS = {s: s + ("es" if s.endswith("s") else "s") for s in SHAPES}
_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

# split -> (seed, questions); the seeds are part of the benchmark: never change them.
SPLITS: dict[str, tuple[int, int]] = {"train": (1_001, 20_000), "validation": (2_002, 2_000), "test": (3_003, 5_000)}
_STREAM_SALT = 4_004  # keeps stream scenes apart from every split's


class QuestionFamily(str, Enum):
    """What a question asks; each family has one template (see docs/scenes.md)."""

    COLOUR = "colour"  # what color is the star?
    SHAPE = "shape"  # what shape is the red object?
    QUADRANT = "quadrant"  # where is the blue circle?
    COUNT = "count"  # how many red objects are there? / how many circles are there?
    PRESENCE = "presence"  # is there a green square?
    RELATION = "relation"  # is the red circle left of the blue square?
    DESCRIBE = "describe"  # describe the object in the top left


@dataclass(frozen=True)
class Background:
    """A muted texture under the objects; the noise field also lies on the objects.

    Attributes:
        kind: ``"noise"``, ``"stripes"`` or ``"checker"``.
        rgb: base colour, a low-saturation mid tone so every object colour stands out.
        amplitude: texture contrast in uint8 levels (stripes and checker).
        period_px: stripe width or checker cell side.
        vertical: stripes run vertically.
        noise_std: per-pixel noise in uint8 levels, fixed per scene (it does not change between frames).
        noise_seed: seed of that noise field.
    """

    kind: str
    rgb: tuple[int, int, int]
    amplitude: int
    period_px: int
    vertical: bool
    noise_std: float
    noise_seed: int


@dataclass(frozen=True)
class SceneObject:
    """One drawn object and what is left of it in the pixels.

    Attributes:
        shape / colour / size: names from ``SHAPES``, ``COLOURS``, ``SIZES``.
        size_px: side of the square the shape is inscribed in.
        centre: (x, y) in px; the shape is symmetric about it (the triangle's box centre).
        bbox: (x0, y0, x1, y1) in px, end exclusive, of the drawn pixels (covered ones included).
        area_px / visible_px: pixels drawn, and those not covered by later objects.
    """

    shape: str
    colour: str
    size: str
    size_px: int
    centre: tuple[int, int]
    bbox: tuple[int, int, int, int]
    area_px: int
    visible_px: int

    def __post_init__(self) -> None:
        problems = []
        if self.shape not in SHAPES:
            problems.append(f"shape {self.shape!r} not in {SHAPES}")
        if self.colour not in COLOURS:
            problems.append(f"colour {self.colour!r} not in {tuple(COLOURS)}")
        if self.size not in SIZES:
            problems.append(f"size {self.size!r} not in {tuple(SIZES)}")
        elif not SIZES[self.size][0] <= self.size_px <= SIZES[self.size][1]:
            problems.append(f"size_px {self.size_px} outside {self.size} {SIZES[self.size]}")
        if not 0 <= self.visible_px <= self.area_px:
            problems.append(f"need 0 <= visible_px <= area_px, got {self.visible_px}, {self.area_px}")
        if problems:
            raise ConfigError("invalid scene object: " + "; ".join(problems))

    @property
    def visible(self) -> bool:
        return self.visible_px >= VISIBLE_MIN * self.area_px

    @property
    def description(self) -> str:
        """The describe family's answer: size, colour, shape."""
        return f"{self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """What one image shows; ``image_from_scene`` turns it into pixels."""

    background: Background
    objects: tuple[SceneObject, ...]


class _Body(NamedTuple):
    """An object before its cover is known: what layout and motion change."""

    shape: str
    colour: str
    size: str
    size_px: int
    centre: tuple[int, int]


class _Question(NamedTuple):
    family: QuestionFamily
    text: str
    answer: str
    support: tuple[int, ...]  # indices into the scene's objects that the answer is about


# --- geometry and pixels -------------------------------------------------------------------


def _shape_mask(body: _Body) -> tuple[int, int, np.ndarray]:
    """(x0, y0, mask) of the body's pixels, tested at pixel centres; the window lies in the image."""
    cx, cy = body.centre
    r = body.size_px / 2
    x0, x1 = max(0, int(np.floor(cx - r))), min(IMAGE_PX, int(np.ceil(cx + r)))
    y0, y1 = max(0, int(np.floor(cy - r))), min(IMAGE_PX, int(np.ceil(cy + r)))
    dx = np.arange(x0, x1) + 0.5 - cx  # (W,)
    dy = (np.arange(y0, y1) + 0.5 - cy)[:, None]  # (H, 1)
    ax, ay = np.abs(dx), np.abs(dy)
    if body.shape == "circle":
        mask = dx * dx + dy * dy <= r * r
    elif body.shape == "square":
        mask = (ax <= r) & (ay <= r)
    elif body.shape == "diamond":
        mask = ax + ay <= r
    elif body.shape == "cross":
        arm = 0.35 * r
        mask = ((ax <= arm) & (ay <= r)) | ((ay <= arm) & (ax <= r))
    elif body.shape == "triangle":  # apex up, base at the bottom edge
        mask = (dy <= r) & (2 * ax <= dy + r)
    else:  # star: five points; fold the angle into one half-point, test against its edge
        sector = 2 * np.pi / 5
        phi = np.mod(np.arctan2(dx, -dy), sector)
        phi = np.minimum(phi, sector - phi)
        d = np.hypot(dx, dy)
        inner = 0.5 * r
        ex, ey = inner * np.cos(sector / 2) - r, inner * np.sin(sector / 2)
        mask = ex * d * np.sin(phi) - ey * (d * np.cos(phi) - r) >= 0
    return x0, y0, mask


def _owners(masks: Sequence[tuple[int, int, np.ndarray]]) -> np.ndarray:
    """(192, 192) int8: which object owns each pixel (last drawn wins), -1 for the background."""
    label = np.full((IMAGE_PX, IMAGE_PX), -1, np.int8)
    for k, (x0, y0, m) in enumerate(masks):
        label[y0 : y0 + m.shape[0], x0 : x0 + m.shape[1]][m] = k
    return label


def owner_map(objects: Sequence[SceneObject]) -> np.ndarray:
    """(192, 192) int8: the index of the object each pixel shows, -1 where it shows the background.

    What a per-token training label needs (which shape and colour a patch shows), and exactly
    the cover the bookkeeping counted: the same masks, drawn in the same order.
    """
    return _owners([_shape_mask(_Body(o.shape, o.colour, o.size, o.size_px, o.centre)) for o in objects])


def _settled(bodies: Sequence[_Body]) -> tuple[SceneObject, ...]:
    """Objects with their drawn box and uncovered pixels, drawing ``bodies`` in order."""
    masks = [_shape_mask(b) for b in bodies]
    label = _owners(masks)
    visible = np.bincount(label[label >= 0], minlength=len(bodies))
    objects = []
    for k, (body, (x0, y0, m)) in enumerate(zip(bodies, masks)):
        ys, xs = np.nonzero(m)
        bbox = (x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1)
        objects.append(SceneObject(*body, bbox=bbox, area_px=int(m.sum()), visible_px=int(visible[k])))
    return tuple(objects)


def _texture(bg: Background) -> np.ndarray:
    """float32 (H, W, 3): the background without its noise."""
    img = np.empty((IMAGE_PX, IMAGE_PX, 3), np.float32)
    img[:] = bg.rgb
    if bg.kind == "noise":
        return img
    cells = np.arange(IMAGE_PX) // bg.period_px
    if bg.kind == "stripes":
        sign = (cells % 2)[None, :] if bg.vertical else (cells % 2)[:, None]
    else:
        sign = (cells[:, None] + cells[None, :]) % 2
    return img + (bg.amplitude * (2 * sign - 1.0))[..., None].astype(np.float32)


def image_from_scene(scene: Scene) -> np.ndarray:
    """uint8 (192, 192, 3) pixels of ``scene``; the same scene gives the same bytes everywhere."""
    img = _texture(scene.background)
    for obj in scene.objects:
        x0, y0, m = _shape_mask(_Body(obj.shape, obj.colour, obj.size, obj.size_px, obj.centre))
        img[y0 : y0 + m.shape[0], x0 : x0 + m.shape[1]][m] = COLOURS[obj.colour]
    noise = np.random.default_rng(scene.background.noise_seed).standard_normal(img.shape, dtype=np.float32)
    return np.clip(np.rint(img + scene.background.noise_std * noise), 0, 255).astype(np.uint8)


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def support_patches(objects: Sequence[SceneObject], patch_px: int = PATCH_PX) -> np.ndarray:
    """Row-major indices (sorted int64) of the ``patch_px`` grid cells the objects' boxes touch.

    This is what a question needs to see: ``len(support_patches(...)) / (IMAGE_PX // patch_px) ** 2``
    is its share of the image tokens. An empty support (a "no" or "zero" answer) needs no
    particular patch, though a model still has to look to rule objects out.

    Raises:
        ConfigError: ``patch_px`` does not divide the 192 px image.
    """
    if patch_px < 1 or IMAGE_PX % patch_px:
        raise ConfigError(f"patch_px must divide the {IMAGE_PX} px image (8, 12, 16, 24, 32, ...), got {patch_px}")
    grid = IMAGE_PX // patch_px
    cells: set[int] = set()
    for o in objects:
        x0, y0, x1, y1 = o.bbox
        rows, cols = range(y0 // patch_px, (y1 - 1) // patch_px + 1), range(x0 // patch_px, (x1 - 1) // patch_px + 1)
        cells.update(r * grid + c for r in rows for c in cols)
    return np.array(sorted(cells), np.int64)


# --- layout --------------------------------------------------------------------------------


def _random_background(rng: np.random.Generator) -> Background:
    kind = ("noise", "stripes", "checker")[int(rng.integers(3))]
    grey = int(rng.integers(100, 161))
    r, g, b = (grey + int(t) for t in rng.integers(-14, 15, size=3))
    return Background(
        kind=kind,
        rgb=(r, g, b),
        amplitude=int(rng.integers(6, 13)),
        period_px=int(rng.integers(5, 21)),
        vertical=bool(rng.integers(2)),
        noise_std=float(rng.uniform(8.0, 12.0) if kind == "noise" else rng.uniform(3.0, 5.0)),
        noise_seed=int(rng.integers(2**31)),
    )


def _random_body(rng: np.random.Generator) -> _Body:
    size = tuple(SIZES)[int(rng.integers(len(SIZES)))]
    lo, hi = SIZES[size]
    size_px = int(rng.integers(lo, hi + 1))
    half = (size_px + 1) // 2
    x, y = (int(v) for v in rng.integers(half, IMAGE_PX - half + 1, size=2))
    return _Body(SHAPES[int(rng.integers(len(SHAPES)))], tuple(COLOURS)[int(rng.integers(len(COLOURS)))], size, size_px, (x, y))


def _random_scene(rng: np.random.Generator) -> Scene:
    background = _random_background(rng)
    bodies = [_random_body(rng) for _ in range(int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1)))]
    return Scene(background, _settled(bodies))


# --- questions -----------------------------------------------------------------------------


def _pick(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))]


def _identified(objects: Sequence[SceneObject], key: Callable[[SceneObject], object]) -> list[int]:
    """Objects a key names unambiguously: the only one with that key, and visible."""
    keys = [key(o) for o in objects]
    return [i for i, o in enumerate(objects) if o.visible and keys.count(keys[i]) == 1]


def _quadrants_of(obj: SceneObject) -> tuple[str, ...]:
    """Quadrants the centre may be read as: one if clear, two or four near the midlines."""

    def sides(v: int, low: str, high: str) -> tuple[str, ...]:
        mid = IMAGE_PX // 2
        return (low,) if v < mid - QUADRANT_MARGIN_PX else (high,) if v > mid + QUADRANT_MARGIN_PX else (low, high)

    x, y = obj.centre
    return tuple(f"{row} {col}" for row in sides(y, "top", "bottom") for col in sides(x, "left", "right"))


def _named(o: SceneObject) -> str:
    return f"{o.colour} {o.shape}"


def _ask_attribute(family: QuestionFamily, objects: Sequence[SceneObject], rng: np.random.Generator) -> _Question | None:
    """The colour of the only object of a shape (COLOUR), or the shape of the only one of a colour (SHAPE)."""
    by_shape = family is QuestionFamily.COLOUR
    picks = _identified(objects, (lambda o: o.shape) if by_shape else (lambda o: o.colour))
    if not picks:
        return None
    i = _pick(rng, picks)
    o = objects[i]
    if by_shape:
        return _Question(family, f"what color is the {o.shape}?", o.colour, (i,))
    return _Question(family, f"what shape is the {o.colour} object?", o.shape, (i,))


def _ask_quadrant(objects: Sequence[SceneObject], rng: np.random.Generator) -> _Question | None:
    picks = [i for i in _identified(objects, _named) if len(_quadrants_of(objects[i])) == 1]
    if not picks:
        return None
    i = _pick(rng, picks)
    return _Question(QuestionFamily.QUADRANT, f"where is the {_named(objects[i])}?", _quadrants_of(objects[i])[0], (i,))


def _ask_count(objects: Sequence[SceneObject], rng: np.random.Generator) -> _Question | None:
    """Pick the answer first (uniform over the counts this scene offers), then what to count."""
    by_count: dict[int, list[tuple[str, tuple[int, ...]]]] = {}
    for attr, text in [
        *((c, f"how many {c} objects are there?") for c in COLOURS),
        *((s, f"how many {_PLURALS[s]} are there?") for s in SHAPES),
    ]:
        matches = [i for i, o in enumerate(objects) if attr in (o.colour, o.shape)]
        if all(objects[i].visible for i in matches):  # a half-covered match would make the count ambiguous
            by_count.setdefault(len(matches), []).append((text, tuple(matches)))
    if not by_count:
        return None
    count = _pick(rng, sorted(by_count))
    text, support = _pick(rng, by_count[count])
    return _Question(QuestionFamily.COUNT, text, COUNT_WORDS[count], support)


def _ask_presence(objects: Sequence[SceneObject], rng: np.random.Generator) -> _Question | None:
    """A fair coin picks yes or no; a "no" names a near miss (its colour or shape is in the scene)."""
    if rng.random() < 0.5:
        colour, shape = _pick(rng, sorted({(o.colour, o.shape) for o in objects if o.visible}))
        answer = "yes"
    else:
        present = {(o.colour, o.shape) for o in objects}
        near = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present and any(c == o.colour or s == o.shape for o in objects)]
        colour, shape = _pick(rng, near)
        answer = "no"
    support = tuple(i for i, o in enumerate(objects) if o.visible and (o.colour, o.shape) == (colour, shape))
    article = "an" if colour[0] in "aeiou" else "a"
    return _Question(QuestionFamily.PRESENCE, f"is there {article} {colour} {shape}?", answer, support)


def _ask_relation(objects: Sequence[SceneObject], rng: np.random.Generator) -> _Question | None:
    """A true relation between two clearly separated objects; a fair coin asks it or its opposite."""
    ids = _identified(objects, _named)
    facts = []  # (a, relation, b), true
    for a in ids:
        for b in ids:
            (xa, ya), (xb, yb) = objects[a].centre, objects[b].centre
            if xb - xa >= RELATION_GAP_PX:
                facts.append((a, "left of", b))
            if yb - ya >= RELATION_GAP_PX:
                facts.append((a, "above", b))
    if not facts:
        return None
    a, relation, b = _pick(rng, facts)
    if rng.random() < 0.5:  # the same fact seen from the other object
        a, relation, b = b, _OPPOSITE[relation], a
    answer = "yes" if rng.random() < 0.5 else "no"
    asked = relation if answer == "yes" else _OPPOSITE[relation]
    text = f"is the {_named(objects[a])} {asked} the {_named(objects[b])}?"
    return _Question(QuestionFamily.RELATION, text, answer, (a, b))


def _ask_describe(objects: Sequence[SceneObject], rng: np.random.Generator) -> _Question | None:
    quadrants = [_quadrants_of(o) for o in objects]
    picks = []
    for q in QUADRANTS:
        inside = [i for i, qs in enumerate(quadrants) if q in qs]
        if len(inside) == 1 and objects[inside[0]].visible and len(quadrants[inside[0]]) == 1:
            picks.append((q, inside[0]))
    if not picks:
        return None
    q, i = _pick(rng, picks)
    return _Question(QuestionFamily.DESCRIBE, f"describe the object in the {q}", objects[i].description, (i,))


_ASKERS: dict[QuestionFamily, Callable[[Sequence[SceneObject], np.random.Generator], _Question | None]] = {
    QuestionFamily.COLOUR: partial(_ask_attribute, QuestionFamily.COLOUR),
    QuestionFamily.SHAPE: partial(_ask_attribute, QuestionFamily.SHAPE),
    QuestionFamily.QUADRANT: _ask_quadrant,
    QuestionFamily.COUNT: _ask_count,
    QuestionFamily.PRESENCE: _ask_presence,
    QuestionFamily.RELATION: _ask_relation,
    QuestionFamily.DESCRIBE: _ask_describe,
}


def _questions_for(objects: Sequence[SceneObject], rng: np.random.Generator, n: int) -> list[_Question]:
    """Up to ``n`` distinct questions, families taken in a random order and cycled (so they balance)."""
    families = list(QuestionFamily)
    order = [families[i] for i in rng.permutation(len(families))]
    asked: list[_Question] = []
    for attempt in range(4 * len(order)):
        q = _ASKERS[order[attempt % len(order)]](objects, rng)
        if q is not None and all(q.text != a.text for a in asked):
            asked.append(q)
            if len(asked) == n:
                break
    return asked


def answer_vocabulary() -> tuple[str, ...]:
    """Every answer any question can have, sorted: colours, shapes, quadrants, counts, yes/no, descriptions."""
    return _VOCABULARY


_VOCABULARY = tuple(
    sorted({*COLOURS, *SHAPES, *QUADRANTS, *COUNT_WORDS, "no", "yes", *(f"{z} {c} {s}" for z in SIZES for c in COLOURS for s in SHAPES)})
)
ANSWER_WORDS: tuple[str, ...] = tuple(sorted({w for a in _VOCABULARY for w in a.split()}))
"""Every word of every answer, sorted: a word-level decoder needs only these."""


# --- splits --------------------------------------------------------------------------------


class SceneImages(Sequence[np.ndarray]):
    """Pixels of a split's images, rendered on demand: ``images[i]`` (192, 192, 3) or ``images[ids]`` (n, 192, 192, 3)."""

    def __init__(self, scenes: tuple[Scene, ...]):
        self._scenes = scenes

    def __len__(self) -> int:
        return len(self._scenes)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self._scenes), IMAGE_PX, IMAGE_PX, 3)

    def __getitem__(self, key: int | slice | Sequence[int] | np.ndarray) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            return image_from_scene(self._scenes[key])
        ids = range(len(self._scenes))[key] if isinstance(key, slice) else np.asarray(key, np.int64).reshape(-1)
        out = np.empty((len(ids), IMAGE_PX, IMAGE_PX, 3), np.uint8)  # (n, H, W, 3)
        for row, i in enumerate(ids):
            out[row] = image_from_scene(self._scenes[int(i)])
        return out


class ScenePngs(Sequence[bytes]):
    """PNG bytes of a split's images (what a camera client would send), encoded on demand."""

    def __init__(self, scenes: tuple[Scene, ...]):
        self._scenes = scenes

    def __len__(self) -> int:
        return len(self._scenes)

    def __getitem__(self, key: int) -> bytes:
        return _png(image_from_scene(self._scenes[key]))


@dataclass(frozen=True)
class ScenesSplit:
    """One split: like ``EasyVqaSplit``, plus each question's family and support.

    Attributes:
        name / seed: the split and the seed its scenes are drawn from.
        scenes: per image id, its background and objects (what the pixels show).
        questions / answers / families: one entry per question.
        image_ids: int64 (N_questions,), the image each question is about.
        supports: per question, indices into its scene's objects that the answer is about.
    """

    name: str
    seed: int
    scenes: tuple[Scene, ...]
    questions: tuple[str, ...]
    answers: tuple[str, ...]
    image_ids: np.ndarray
    families: tuple[QuestionFamily, ...]
    supports: tuple[tuple[int, ...], ...]

    def __len__(self) -> int:
        return len(self.questions)

    @property
    def images(self) -> SceneImages:
        """uint8 pixels per image id, rendered on demand (about 2 ms each)."""
        return SceneImages(self.scenes)

    @property
    def image_pngs(self) -> ScenePngs:
        return ScenePngs(self.scenes)

    def relevant_patches(self, question: int, patch_px: int = PATCH_PX) -> np.ndarray:
        """The patches question ``question``'s support objects touch (see ``support_patches``)."""
        objects = self.scenes[int(self.image_ids[question])].objects
        return support_patches([objects[i] for i in self.supports[question]], patch_px)


@lru_cache(maxsize=4)
def load_scenes(split: str, questions: int | None = None) -> ScenesSplit:
    """Build ``"train"`` (20,000 questions), ``"validation"`` (2,000) or ``"test"`` (5,000).

    Image ``i`` of a split is drawn from ``numpy.random.default_rng([seed, i])`` and gets
    ``QUESTIONS_PER_IMAGE`` questions, so ``questions=n`` gives the first ``n`` questions of the
    full split (a prefix, for quick tests) and image counts are questions / 5.

    Raises:
        ConfigError: unknown split, or ``questions`` outside 1..the split's size.
    """
    if split not in SPLITS:
        hint = " (did you mean 'validation'?)" if split.lower() in ("val", "valid", "dev") else ""
        raise ConfigError(f"unknown scenes split {split!r}{hint}; expected one of {', '.join(map(repr, SPLITS))}")
    seed, full = SPLITS[split]
    if questions is None:
        questions = full
    if not 1 <= questions <= full:
        raise ConfigError(
            f"questions={questions} for the {split} split: expected 1..{full} (or None for all); "
            "split sizes are fixed so that results compare"
        )
    return _draw(split, seed, 0, lambda scenes, asked: len(asked) >= questions, questions)


def load_training_pool(pool: int, images: int) -> ScenesSplit:
    """Images ``pool * images`` .. ``(pool + 1) * images - 1`` of the training sequence, with their questions.

    The train split is the first 4,000 images of an unbounded sequence (image ``i`` from
    ``default_rng([train seed, i])``); a recipe that has seen those draws fresh scenes from
    further along it instead of seeing the same 4,000 again (a 4-layer model memorises them by
    the 16th epoch: training loss kept falling while validation accuracy stayed at 57 %).
    Validation and test use other seeds, so no pool ever holds one of their scenes.

    Raises:
        ConfigError: a negative pool or an image count below 1.
    """
    if pool < 0 or images < 1:
        raise ConfigError(f"training pool {pool} of {images} images: expected pool >= 0 and images >= 1")
    seed = SPLITS["train"][0]
    return _draw(f"train-pool-{pool}", seed, pool * images, lambda scenes, asked: len(scenes) >= images, None)


def _draw(name: str, seed: int, first_image: int, done: Callable, questions: int | None) -> ScenesSplit:
    """Scenes ``first_image``, ``first_image + 1``, ... of ``seed`` with their questions, until ``done(scenes, asked)``."""
    scenes: list[Scene] = []
    asked: list[tuple[int, _Question]] = []
    while not done(scenes, asked):
        rng = np.random.default_rng([seed, first_image + len(scenes)])
        scene = _random_scene(rng)
        asked.extend((len(scenes), q) for q in _questions_for(scene.objects, rng, QUESTIONS_PER_IMAGE))
        scenes.append(scene)
    asked = asked[:questions]
    return ScenesSplit(
        name=name,
        seed=seed,
        scenes=tuple(scenes),
        questions=tuple(q.text for _, q in asked),
        answers=tuple(q.answer for _, q in asked),
        image_ids=np.array([i for i, _ in asked], np.int64),
        families=tuple(q.family for _, q in asked),
        supports=tuple(q.support for _, q in asked),
    )


# --- streams -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SceneStreamOptions:
    """Shape of the stream workload.

    Attributes:
        scenes: scenes in a row; a new scene is a cut.
        frames_per_scene: frames each scene is held for.
        movers: objects per scene that move (every scene has at least 3 objects).
        max_step_px: largest step per frame and axis; steps of 1..max px, in a fixed direction, bouncing off the edges.
        question_every: a question at every n-th frame of a scene, starting with the first.
        seed: the one seed everything is drawn from.
    """

    scenes: int = 4
    frames_per_scene: int = 12
    movers: int = 2
    max_step_px: int = 3
    question_every: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.scenes < 1 or self.frames_per_scene < 1 or self.question_every < 1:
            problems.append(
                f"scenes, frames_per_scene and question_every must be >= 1, got {self.scenes}, {self.frames_per_scene}, {self.question_every}"
            )
        if not 0 <= self.movers <= MIN_OBJECTS:
            problems.append(f"movers must be in 0..{MIN_OBJECTS} (the fewest objects a scene has), got {self.movers}")
        if not 1 <= self.max_step_px <= PATCH_PX // 2:
            problems.append(f"max_step_px must be in 1..{PATCH_PX // 2} (longer steps change most patches), got {self.max_step_px}")
        if problems:
            raise ConfigError("invalid scene stream options: " + "; ".join(problems))


@dataclass(frozen=True)
class SceneFrame:
    """One frame: like ``streams.StreamFrame``, with the objects as they are in this frame.

    ``objects`` keep their draw order across a scene's frames, so index ``k`` is the same object;
    ``support`` indexes them.
    """

    index: int
    scene: int
    pixels: np.ndarray
    objects: tuple[SceneObject, ...]
    question: str | None
    answer: str | None
    family: QuestionFamily | None
    support: tuple[int, ...]


@dataclass(frozen=True)
class SceneStream:
    frames: tuple[SceneFrame, ...]
    options: SceneStreamOptions

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def questions(self) -> int:
        return sum(f.question is not None for f in self.frames)


def _stepped(centre: tuple[int, int], velocity: list[int], size_px: int) -> tuple[int, int]:
    """One step of ``centre``; a step that would leave the image reverses that axis (in place)."""
    half = (size_px + 1) // 2
    moved = []
    for axis in range(2):
        v = centre[axis] + velocity[axis]
        if not half <= v <= IMAGE_PX - half:
            velocity[axis] = -velocity[axis]
            v = centre[axis] + velocity[axis]
        moved.append(v)
    return moved[0], moved[1]


def scene_stream(options: SceneStreamOptions = SceneStreamOptions()) -> SceneStream:
    """Frames of scenes whose ``movers`` objects drift a few px per frame over a still background.

    The background's noise is fixed per scene, so a patch no object enters or leaves is the same
    bytes in consecutive frames. Each question is asked about the frame it comes with.
    """
    frames = []
    for s in range(options.scenes):
        rng = np.random.default_rng([_STREAM_SALT, options.seed, s])
        scene = _random_scene(rng)
        bodies = [_Body(o.shape, o.colour, o.size, o.size_px, o.centre) for o in scene.objects]
        movers = [int(i) for i in rng.choice(len(bodies), size=options.movers, replace=False)]
        velocity = {
            i: [int(rng.integers(1, options.max_step_px + 1)) * (1 if rng.random() < 0.5 else -1) for _ in range(2)] for i in movers
        }
        objects = scene.objects
        for j in range(options.frames_per_scene):
            if j > 0:
                for i in movers:
                    bodies[i] = bodies[i]._replace(centre=_stepped(bodies[i].centre, velocity[i], bodies[i].size_px))
                objects = _settled(bodies)
            asked = _questions_for(objects, rng, 1) if j % options.question_every == 0 else []
            q = asked[0] if asked else None
            frames.append(
                SceneFrame(
                    index=len(frames),
                    scene=s,
                    pixels=image_from_scene(Scene(scene.background, objects)),
                    objects=objects,
                    question=q.text if q else None,
                    answer=q.answer if q else None,
                    family=q.family if q else None,
                    support=q.support if q else (),
                )
            )
    return SceneStream(tuple(frames), options)
