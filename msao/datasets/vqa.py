"""The VQA datasets msao evaluates and calibrates on, behind one loader: easy-VQA and scenes.

``msao eval``, ``msao calibrate`` and the benchmark ask questions the same way whatever the data;
what differs is where the split comes from and how answers group into kinds for per-kind
accuracy (easy-VQA: by what the answer names; scenes: by the question's family).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from msao.errors import ConfigError

__all__ = ["DATASETS", "EASY_VQA_ANSWER_KINDS", "VqaSplit", "dataset_splits", "load_vqa", "question_kinds"]

DATASETS = ("easy-vqa", "scenes")
_SPLITS = {"easy-vqa": ("train", "test"), "scenes": ("train", "validation", "test")}

EASY_VQA_ANSWER_KINDS = {
    "shape": ("circle", "rectangle", "triangle"),
    "colour": ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow"),
    "yes/no": ("yes", "no"),
}


class VqaSplit(Protocol):
    """What every split offers: questions about images, by image id."""

    name: str
    questions: tuple[str, ...]
    answers: tuple[str, ...]
    image_ids: np.ndarray

    @property
    def images(self) -> Sequence[np.ndarray]: ...  # uint8 (H, W, 3) per image id

    @property
    def image_pngs(self) -> Sequence[bytes]: ...  # what a camera client would send, per image id

    def __len__(self) -> int: ...


def dataset_splits(dataset: str) -> tuple[str, ...]:
    """The split names of ``dataset``, or a ``ConfigError`` naming the datasets there are."""
    if dataset not in _SPLITS:
        raise ConfigError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    return _SPLITS[dataset]


def load_vqa(dataset: str, split: str) -> VqaSplit:
    """Split ``split`` of ``dataset`` (easy-VQA from its pip package, scenes generated here)."""
    if split not in dataset_splits(dataset):
        raise ConfigError(f"{dataset} has splits {', '.join(dataset_splits(dataset))}, not {split!r}")
    if dataset == "scenes":
        from msao.datasets.scenes import load_scenes

        return load_scenes(split)
    from msao.datasets.easyvqa import load_easy_vqa

    return load_easy_vqa(split)


def question_kinds(data: VqaSplit) -> tuple[str, ...]:
    """Per question, the kind its accuracy is reported under: the family (scenes) or what the answer names (easy-VQA)."""
    families = getattr(data, "families", None)
    if families is not None:
        return tuple(str(f.value) for f in families)
    kind_of = {word: kind for kind, words in EASY_VQA_ANSWER_KINDS.items() for word in words}
    return tuple(kind_of.get(a, "other") for a in data.answers)
