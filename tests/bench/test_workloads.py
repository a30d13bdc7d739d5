"""The benchmark's workloads: the same request items from either dataset."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from bench.run import stream_workload, workload
from msao.datasets.scenes import load_scenes


def test_scenes_questions_reach_the_benchmark_as_png_requests_with_their_truth():
    items = workload(12, seed=0, dataset="scenes")
    test = load_scenes("test")
    assert len(items) == 12 and len({i.index for i in items}) == 12
    for item in items:
        assert item.question == test.questions[item.index] and item.truth == test.answers[item.index]
        pixels = np.asarray(Image.open(io.BytesIO(item.png)).convert("RGB"))
        assert np.array_equal(pixels, test.images[int(test.image_ids[item.index])])
    assert workload(12, seed=0, dataset="scenes") == items  # seeded
    assert [i.index for i in workload(12, seed=1, dataset="scenes")] != [i.index for i in items]


def test_the_scenes_stream_asks_in_frame_order_with_one_stream_id_per_scene():
    items = stream_workload(10, seed=0, dataset="scenes")
    assert len(items) == 10 and [i.index for i in items] == list(range(10))
    streams = [i.stream for i in items]
    assert len(set(streams)) >= 2 and streams == sorted(streams, key=lambda s: int(s.split("-")[1]))
    assert all(Image.open(io.BytesIO(i.png)).size == (192, 192) for i in items)
