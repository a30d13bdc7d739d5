"""A camera-stream workload built from easy-VQA images: scenes held for several frames, then cut.

Each scene is one easy-VQA image shown for a random number of frames; every frame gets fresh
Gaussian sensor noise and, now and then, a small camera shift (edge pixels replicated, no
wrap-around). Questions about the scene's image are asked at random frames. Everything is
drawn from one seed, so a workload is the same on every machine. Knows nothing of models.

    scene 0: frame frame frame(q) frame | scene 1: frame(q) frame ... | scene 2: ...
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from msao.datasets.easyvqa import EasyVqaSplit, load_easy_vqa
from msao.errors import ConfigError

__all__ = ["FrameStream", "StreamFrame", "StreamOptions", "stream_from_easy_vqa", "stream_from_split"]


@dataclass(frozen=True)
class StreamOptions:
    """Shape of the workload.

    Attributes:
        scenes: number of scenes (distinct easy-VQA images, drawn without replacement).
        min_frames / max_frames: frames per scene, uniform in [min, max].
        noise_std: Gaussian sensor noise per pixel and frame, in uint8 levels.
        shift_prob: chance that a frame is shifted against the scene's first frame.
        max_shift_px: largest shift in pixels, per axis.
        question_prob: chance that a frame carries a question (the first frame of a scene always does).
        split: easy-VQA split the images and questions come from.
        seed: the one seed everything is drawn from.
    """

    scenes: int = 100
    min_frames: int = 4
    max_frames: int = 12
    noise_std: float = 2.0
    shift_prob: float = 0.2
    max_shift_px: int = 1
    question_prob: float = 0.25
    split: str = "test"
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.scenes < 1:
            problems.append(f"scenes must be >= 1, got {self.scenes}")
        if not 1 <= self.min_frames <= self.max_frames:
            problems.append(f"need 1 <= min_frames <= max_frames, got {self.min_frames}, {self.max_frames}")
        if self.noise_std < 0 or self.max_shift_px < 0:
            problems.append(f"noise_std and max_shift_px must be >= 0, got {self.noise_std}, {self.max_shift_px}")
        if not (0.0 <= self.shift_prob <= 1.0 and 0.0 <= self.question_prob <= 1.0):
            problems.append(f"shift_prob and question_prob must be in [0, 1], got {self.shift_prob}, {self.question_prob}")
        if problems:
            raise ConfigError("invalid stream options: " + "; ".join(problems))


@dataclass(frozen=True)
class StreamFrame:
    """One frame of the stream.

    Attributes:
        index: position in the stream.
        scene: scene number; a new scene is a cut.
        image_id: easy-VQA image shown.
        pixels: uint8 (H, W, 3) with noise and shift applied.
        shift: (dy, dx) in pixels against the original image.
        question / answer: the question asked at this frame and its answer, or None.
    """

    index: int
    scene: int
    image_id: int
    pixels: np.ndarray
    shift: tuple[int, int]
    question: str | None
    answer: str | None


@dataclass(frozen=True)
class FrameStream:
    frames: tuple[StreamFrame, ...]
    options: StreamOptions

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def questions(self) -> int:
        return sum(f.question is not None for f in self.frames)


def _shifted(img: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Move the picture by (dy, dx) pixels, replicating edge pixels into the uncovered border."""
    h, w, _ = img.shape
    pad = np.pad(img, ((abs(dy), abs(dy)), (abs(dx), abs(dx)), (0, 0)), mode="edge")
    y0, x0 = abs(dy) - dy, abs(dx) - dx
    return pad[y0 : y0 + h, x0 : x0 + w]


def stream_from_split(data: EasyVqaSplit, options: StreamOptions = StreamOptions()) -> FrameStream:
    """The stream workload over an already loaded split (see ``stream_from_easy_vqa``)."""
    rng = np.random.default_rng(options.seed)
    n_images = data.images.shape[0]
    if options.scenes > n_images:
        raise ConfigError(f"{options.scenes} scenes asked, the {data.name} split has {n_images} images")
    by_image: dict[int, list[int]] = {}
    for q, im in enumerate(data.image_ids.tolist()):
        by_image.setdefault(im, []).append(q)
    images = rng.choice(n_images, size=options.scenes, replace=False)
    frames = []
    for scene, im in enumerate(images.tolist()):
        n_frames = int(rng.integers(options.min_frames, options.max_frames + 1))
        base = data.images[im]
        for j in range(n_frames):
            dy = dx = 0
            if j > 0 and options.max_shift_px > 0 and rng.random() < options.shift_prob:
                dy, dx = (int(v) for v in rng.integers(-options.max_shift_px, options.max_shift_px + 1, size=2))
            img = _shifted(base, dy, dx).astype(np.float64)
            img = np.clip(np.rint(img + rng.normal(0.0, options.noise_std, img.shape)), 0, 255).astype(np.uint8)
            question = answer = None
            if (j == 0 or rng.random() < options.question_prob) and by_image.get(im):
                q = by_image[im][int(rng.integers(len(by_image[im])))]
                question, answer = data.questions[q], data.answers[q]
            frames.append(StreamFrame(len(frames), scene, im, img, (dy, dx), question, answer))
    return FrameStream(tuple(frames), options)


def stream_from_easy_vqa(options: StreamOptions = StreamOptions()) -> FrameStream:
    """Build the stream workload from easy-VQA ``options.split`` (deterministic in ``options.seed``)."""
    return stream_from_split(load_easy_vqa(options.split), options)
