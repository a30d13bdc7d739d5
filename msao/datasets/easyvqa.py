"""easy-VQA (PyPI ``easy-vqa``): 64x64 images of one coloured shape, questions with one-word answers.

Loads a split into plain arrays once; nothing here downloads anything (the package ships the data).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from msao.errors import MissingDependency

__all__ = ["EasyVqaSplit", "load_easy_vqa"]


@dataclass(frozen=True)
class EasyVqaSplit:
    """One split of easy-VQA.

    Attributes:
        images: uint8 (N_images, 64, 64, 3), indexed by image id.
        questions / answers: one entry per question.
        image_ids: int64 (N_questions,), the image each question is about.
        image_pngs: the original PNG bytes per image id (what a camera client would send).
    """

    name: str
    images: np.ndarray
    image_pngs: tuple[bytes, ...]
    questions: tuple[str, ...]
    answers: tuple[str, ...]
    image_ids: np.ndarray

    def __len__(self) -> int:
        return len(self.questions)


@lru_cache(maxsize=2)
def load_easy_vqa(split: str) -> EasyVqaSplit:
    """Load ``"train"`` (38,575 questions, 4,000 images) or ``"test"`` (9,673 / 1,000)."""
    try:
        import easy_vqa
    except ImportError as exc:
        raise MissingDependency("easy-VQA data needs the easy-vqa package: pip install 'msao[eval]'") from exc
    from PIL import Image

    if split == "train":
        questions, answers, ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    elif split == "test":
        questions, answers, ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    else:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    n = len(paths)
    if sorted(paths) != list(range(n)):
        raise ValueError("easy-vqa image ids are not 0..N-1; unsupported easy-vqa version")
    pngs = []
    images = np.empty((n, 64, 64, 3), np.uint8)
    for i in range(n):
        with open(paths[i], "rb") as f:
            pngs.append(f.read())
        with Image.open(paths[i]) as im:
            images[i] = np.asarray(im.convert("RGB"))
    return EasyVqaSplit(
        name=split,
        images=images,
        image_pngs=tuple(pngs),
        questions=tuple(questions),
        answers=tuple(answers),
        image_ids=np.asarray(ids, np.int64),
    )
