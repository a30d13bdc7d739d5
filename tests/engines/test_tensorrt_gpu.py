"""TensorRT on a GPU: engines built from the edge bundle match ONNX Runtime per segment and answer for
answer, and the MAS kernel reads the vision engine's output buffers in place. Every GPU test skips
with the reason where TensorRT or a GPU is missing (it was written on a machine with neither, so
these have not run yet); the pointer arithmetic they rely on is tested everywhere."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from msao.engines.cuda_buffers import DeviceTensor, device_properties
from msao.engines.mas_cuda import device_matrix
from msao.engines.tensorrt_backend import tensorrt_unavailable_reason
from msao.errors import GpuUnavailable, MasInputError, MissingDependency

TRT_REASON = tensorrt_unavailable_reason()
_skip = pytest.mark.skipif(TRT_REASON is not None, reason=f"needs TensorRT and an NVIDIA GPU: {TRT_REASON}")


def needs_trt_gpu(test):
    return pytest.mark.gpu(_skip(test))


ATOL_FP32 = 1e-4  # TensorRT picks other kernels (and summation orders) than ONNX Runtime's CPU provider
RTOL_FP32 = 1e-3
SCORE_RTOL = 1e-6  # kernel on device buffers vs NumPy reference on the same engine's host copy


# -- everywhere: the pointer arithmetic of the in-place hand-over -------------------------------


def test_one_image_of_a_batched_device_tensor_is_found_at_its_byte_offset():
    t = DeviceTensor("mas_features", 0x10000, (2, 64, 32), "float32")
    assert t.nbytes == 2 * 64 * 32 * 4
    one = t.item(1)
    assert one.ptr == 0x10000 + 64 * 32 * 4 and one.shape == (64, 32) and one.dtype == "float32"
    with pytest.raises(IndexError, match="index 2 outside"):
        t.item(2)


def test_the_mas_kernel_takes_float32_matrices_only():
    assert device_matrix(DeviceTensor("t", 4096, (64, 32), "float32")).shape == (64, 32)
    assert device_matrix(DeviceTensor("t", 4096, (1, 64, 32), "float32")).ptr == 4096
    with pytest.raises(MasInputError, match="reads float32, the device tensor is float16"):
        device_matrix(DeviceTensor("t", 4096, (1, 64, 32), "float16"))
    with pytest.raises(MasInputError, match=r"expected a \(N, D\) or \(B, N, D\)"):
        device_matrix(DeviceTensor("t", 4096, (1, 1, 64, 32), "float32"))


@pytest.mark.skipif(TRT_REASON is None, reason="a GPU is present: the failure path is not reachable")
def test_without_tensorrt_or_a_gpu_the_reason_is_given():
    assert TRT_REASON
    try:
        device_properties()
    except (GpuUnavailable, MissingDependency) as exc:
        assert "GPU" in str(exc) or "CUDA" in str(exc) or "cuda-python" in str(exc)


# -- on a GPU with TensorRT ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(edge_bundle_dir, tmp_path_factory):
    if TRT_REASON is not None:
        pytest.skip(TRT_REASON)
    from msao.engines.bundle import load_bundle
    from msao.engines.engine_builder import BuildOptions, build_engines
    from msao.engines.tensorrt_profiles import ProfileLimits

    root = tmp_path_factory.mktemp("trt") / "bundle"
    shutil.copytree(edge_bundle_dir, root)
    folder, engine_set = build_engines(root, BuildOptions(workspace_mb=256, limits=ProfileLimits(max_seq=128, max_past=128)), progress=print)
    return load_bundle(root), folder, engine_set


@needs_trt_gpu
def test_every_segment_has_a_recorded_engine_for_this_gpu(built):
    from msao.engines.tensorrt_backend import current_target, import_tensorrt

    bundle, folder, engine_set = built
    assert {e.segment for e in engine_set.engines} == {s.name for s in bundle.manifest.segments}
    assert engine_set.target.mismatches(current_target(import_tensorrt())) == []
    assert (folder / "timing.cache").stat().st_size > 0


@needs_trt_gpu
def test_every_segment_matches_onnx_runtime(built):
    from msao.engines.onnxruntime_backend import OnnxRuntimeBackend
    from msao.engines.profile import synthetic_feeds
    from msao.engines.tensorrt_backend import TensorRTBackend

    bundle, _, _ = built
    trt, ort = TensorRTBackend(), OnnxRuntimeBackend()
    rng = np.random.default_rng(0)
    for spec in bundle.manifest.segments:
        with trt.open(bundle, spec) as a, ort.open(bundle, spec) as b:
            for seq, past in ((20, 0), (1, 40), (64, 0)):
                feeds = synthetic_feeds(spec, batch=1, seq=seq, past=past, vocab=bundle.manifest.model.vocab_size, rng=rng)
                got, want = a.infer(feeds), b.infer(feeds)
                for name in want:
                    diff = np.abs(got[name].astype(np.float64) - want[name])
                    assert np.allclose(got[name], want[name], atol=ATOL_FP32, rtol=RTOL_FP32), (
                        f"{spec.name} {name} at seq={seq} past={past}: max diff {diff.max():.3g}, mean {diff.mean():.3g}"
                    )


@needs_trt_gpu
def test_answers_match_onnx_runtime_with_the_kv_cache_kept_on_device(built, easyvqa_test):
    from msao.engines.generation import Generator
    from msao.engines.onnxruntime_backend import OnnxRuntimeBackend
    from msao.engines.tensorrt_backend import TensorRTBackend

    bundle, _, _ = built
    trt, ort = Generator(bundle, TensorRTBackend()), Generator(bundle, OnnxRuntimeBackend())
    for i in range(20):
        png, question = easyvqa_test.image_pngs[easyvqa_test.image_ids[i]], easyvqa_test.questions[i]
        a, b = trt.answer(png, question), ort.answer(png, question)
        assert a.token_ids == b.token_ids, f"{question}: TensorRT {a.text!r}, ONNX Runtime {b.text!r}"


@needs_trt_gpu
def test_mas_kernel_reads_the_vision_engine_output_in_place(built):
    from msao.engines.mas import mas_scores_from_tensors
    from msao.engines.mas_cuda import CudaMas, cuda_mas_unavailable_reason, encode_and_score_on_device
    from msao.engines.tensorrt_backend import TensorRTBackend

    if cuda_mas_unavailable_reason() is not None:
        pytest.skip(f"MAS kernel unavailable: {cuda_mas_unavailable_reason()}")
    bundle, _, _ = built
    p = bundle.manifest.preprocess
    pixels = np.random.default_rng(1).standard_normal((3, p.crop_height, p.crop_width)).astype(np.float32)
    question = np.random.default_rng(2).standard_normal((3, bundle.manifest.model.hidden_size)).astype(np.float32)
    with TensorRTBackend().open(bundle, bundle.segment("vision_encoder")) as runner, CudaMas() as kernel:
        host = runner.infer({"pixel_values": pixels[None]})
        ref = mas_scores_from_tensors(host["mas_features"][0], host["image_tokens"][0], question)
        tokens, got = encode_and_score_on_device(runner, kernel, pixels, question)
    np.testing.assert_array_equal(tokens, host["image_tokens"][0])
    scale = max(ref.saliency_max, 1e-300)
    err = np.abs(got.saliency - ref.saliency) / scale
    assert err.max() <= SCORE_RTOL, f"saliency: max rel err {err.max():.3g}, mean {err.mean():.3g}"
    err = np.abs(got.relevance - ref.relevance)
    assert err.max() <= SCORE_RTOL, f"relevance: max abs err {err.max():.3g}, mean {err.mean():.3g}"
