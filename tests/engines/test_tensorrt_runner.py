"""TrtRunner's own logic on a host-memory engine stand-in (tests/engines/trt_standin.py): whole answers
equal ONNX Runtime's, decode steps keep the KV cache in the runner's device copy, TensorRT 8.6's INT32
inputs are fed, and out-of-profile shapes are refused. Kernels and device memory: test_tensorrt_gpu.py."""

from __future__ import annotations

import numpy as np
import pytest

from msao.engines.backend import Backend, Runner
from msao.engines.bundle import Bundle, load_bundle
from msao.engines.generation import Generator
from msao.engines.manifest import SegmentSpec
from msao.engines.onnxruntime_backend import OnnxRuntimeBackend, OrtOptions
from msao.engines.tensorrt_backend import TrtRunner
from msao.engines.tensorrt_profiles import ProfileLimits, profiles_for_segment
from msao.errors import FeedError
from tests.engines.trt_standin import TRT, HostBuffers, HostStream, OrtEngine

PROB_ATOL = 0.0  # the same ONNX Runtime session computes both sides: bit-identical expected


class StandInBackend(Backend):
    """TrtRunners over ``OrtEngine`` stand-ins; keeps each runner's buffers for inspection."""

    name = "tensorrt-standin"

    def __init__(self, limits: ProfileLimits = ProfileLimits(), int64_as_int32: bool = False):
        self.limits, self.int64_as_int32 = limits, int64_as_int32
        self.buffers: dict[str, HostBuffers] = {}
        self.runners: dict[str, TrtRunner] = {}

    def open(self, bundle: Bundle, spec: SegmentSpec) -> Runner:
        engine = OrtEngine(bundle, spec, profiles_for_segment(spec, bundle.manifest.model, self.limits), self.int64_as_int32)
        buffers = self.buffers[spec.name] = HostBuffers()
        runner = self.runners[spec.name] = TrtRunner(spec, engine, TRT, stream=HostStream(), buffers=buffers)
        return runner


@pytest.fixture(scope="module")
def bundle(edge_bundle_dir):
    return load_bundle(edge_bundle_dir)


@pytest.fixture(scope="module")
def reference(bundle):
    return Generator(bundle, OnnxRuntimeBackend(OrtOptions(threads=1)))


def _pixels(bundle: Bundle, seed: int) -> np.ndarray:
    p = bundle.manifest.preprocess
    return np.random.default_rng(seed).standard_normal((3, p.crop_height, p.crop_width)).astype(np.float32)


@pytest.mark.parametrize("int64_as_int32", [False, True], ids=["trt10-int64", "trt8.6-int32"])
def test_answers_equal_onnx_runtime_token_for_token(bundle, reference, int64_as_int32):
    gen = Generator(bundle, StandInBackend(int64_as_int32=int64_as_int32))
    for seed, question in enumerate(("what color is the shape?", "is there a circle?", "what shape is this?")):
        pixels = _pixels(bundle, seed)
        got = gen.generate(gen.encode_image(pixels), question, keep=np.arange(0, 64, 2))
        want = reference.generate(reference.encode_image(pixels), question, keep=np.arange(0, 64, 2))
        assert got.token_ids == want.token_ids, f"{question}: {got.text!r} vs ONNX Runtime {want.text!r}"
        diff = np.abs(np.asarray(got.token_probs) - np.asarray(want.token_probs))
        assert diff.max() <= PROB_ATOL, f"token probabilities: max diff {diff.max():.3g}, mean {diff.mean():.3g}"


def _kv_uploads(backend: StandInBackend, name: str) -> list:
    return [k for k in backend.buffers[name].uploads if isinstance(k, tuple) and k[0] == "kv"]


def test_decode_steps_keep_the_kv_cache_on_the_device_and_move_only_new_slots(bundle):
    backend = StandInBackend()
    gen = Generator(bundle, backend)
    answer = gen.generate(gen.encode_image(_pixels(bundle, 7)), "what color is the shape?", max_new_tokens=6)
    assert len(answer.token_ids) >= 2, "needs at least one decode step to say anything"
    for name in backend.buffers:
        if name.startswith("decoder"):
            # once per request, at prefill (the zeroed buffers); every decode step binds the device copy in place
            assert len(_kv_uploads(backend, name)) == 2, f"{name}: {_kv_uploads(backend, name)} over {len(answer.token_ids)} steps"
            assert "hidden_states" in backend.buffers[name].uploads


def test_a_cache_changed_on_the_host_is_uploaded_again_and_answers_stay_exact(bundle, reference):
    backend = StandInBackend()
    gen = Generator(bundle, backend)
    stack = gen.stack(bundle.manifest.model.num_layers)
    rng = np.random.default_rng(0)
    h = rng.standard_normal((1, 5, 32)).astype(np.float32)
    ref_stack = reference.stack(bundle.manifest.model.num_layers)
    for s in (stack, ref_stack):
        s.reset(capacity=8)
        s.run(h, np.arange(5)[None], np.ones((1, 5), np.int64))
    before = len(_kv_uploads(backend, "decoder[0:1]"))
    step = rng.standard_normal((1, 1, 32)).astype(np.float32)
    for s in (stack, ref_stack):
        s.run(step, np.asarray([[5]]), np.ones((1, 6), np.int64))  # resident: no upload
        s.truncate(5)  # a rejected token: the device copy no longer matches
        s.run(step, np.asarray([[5]]), np.ones((1, 6), np.int64))
    uploads = _kv_uploads(backend, "decoder[0:1]")[before:]
    assert uploads == [("kv", "past_key_0"), ("kv", "past_value_0")], uploads
    got = stack.run(step, np.asarray([[6]]), np.ones((1, 7), np.int64))
    want = ref_stack.run(step, np.asarray([[6]]), np.ones((1, 7), np.int64))
    np.testing.assert_array_equal(got, want)
    for mine, theirs in zip(stack.caches, ref_stack.caches):
        for name in mine.names:
            np.testing.assert_array_equal(mine.buffer(name)[:, :, : mine.length], theirs.buffer(name)[:, :, : theirs.length])


def test_shapes_outside_the_built_profiles_are_refused_with_the_limit_to_raise(bundle):
    backend = StandInBackend(ProfileLimits(max_seq=8, max_past=16))
    runner = backend.open(bundle, bundle.segment("text_embed"))
    assert runner.infer({"input_ids": np.ones((1, 8), np.int64)})["embeddings"].shape == (1, 8, 32)
    with pytest.raises(FeedError, match=r"text_embed.*input_ids \(1, 9\).*--max-seq"):
        runner.infer({"input_ids": np.ones((1, 9), np.int64)})


def test_prefill_and_decode_switch_profiles_only_when_needed(bundle):
    backend = StandInBackend()
    gen = Generator(bundle, backend)
    gen.generate(gen.encode_image(_pixels(bundle, 3)), "what color is the shape?", max_new_tokens=5)
    runner = backend.runners["decoder[1:2]"]
    assert runner.profiles[0].name == "#0" and len(runner.profiles) == 2
    # prefill (profile 1) then decode (profile 0): two switches per answer, not one per step
    assert runner._context.profile_switches == 2


def test_int64_inputs_beyond_int32_are_refused_for_an_int32_engine(bundle):
    runner = StandInBackend(int64_as_int32=True).open(bundle, bundle.segment("text_embed"))
    with pytest.raises(FeedError, match="beyond INT32"):
        runner.infer({"input_ids": np.asarray([[2**40]], np.int64)})
