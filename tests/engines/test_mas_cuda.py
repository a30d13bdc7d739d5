"""The fused MAS kernel: it compiles for Jetson Orin (sm_87) and Hopper (sm_90) in every run, and
on a GPU it matches the NumPy reference (scores within tolerance, keep-sets identical)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from msao.engines.mas import MasOptions, mas_from_scores, mas_scores_from_tensors
from msao.engines.mas_cuda import KERNEL_NAME, KERNEL_SOURCE, CudaMas, cuda_mas_unavailable_reason
from msao.errors import GpuUnavailable

ARCHS = ("sm_87", "sm_90")  # Jetson Orin, Hopper
SCORE_RTOL = 1e-9  # float64 on both sides: only the summation order differs


def _nvcc() -> str | None:
    for cand in (shutil.which("nvcc"), os.environ.get("CUDA_HOME", "") + "/bin/nvcc", "/usr/local/cuda/bin/nvcc"):
        if cand and Path(cand).is_file():
            return cand
    return None


NVCC = _nvcc()
GPU_REASON = cuda_mas_unavailable_reason()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (install the CUDA toolkit to compile mas.cu)")
needs_gpu = pytest.mark.skipif(GPU_REASON is not None, reason=f"no usable CUDA GPU: {GPU_REASON}")


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
def test_mas_cu_compiles_for(arch, tmp_path):
    out = tmp_path / f"mas_{arch}.cubin"
    r = subprocess.run(
        [NVCC, "-cubin", f"-arch={arch}", "-Werror", "all-warnings", "-o", str(out), str(KERNEL_SOURCE)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, f"nvcc -arch={arch} failed:\n{r.stderr}"
    assert KERNEL_NAME in out.read_bytes()  # extern "C": the binding finds it by this name


@pytest.fixture(scope="module")
def fatbin(tmp_path_factory) -> Path:
    if NVCC is None:
        pytest.skip("nvcc not found")
    out = tmp_path_factory.mktemp("mas") / "mas.fatbin"
    gencode = [x for a in ARCHS for x in ("-gencode", f"arch=compute_{a[3:]},code={a}")]
    r = subprocess.run([NVCC, "-fatbin", *gencode, "-o", str(out), str(KERNEL_SOURCE)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return out


def test_without_a_gpu_the_binding_says_why():
    if GPU_REASON is None:
        pytest.skip("a GPU is present; the failure path is not reachable here")
    with pytest.raises(GpuUnavailable, match="MAS kernel unavailable"):
        CudaMas()


# -- on a GPU: kernel vs reference ----------------------------------------------------------------


def _compare(kernel: CudaMas, f, t, q, prev, opts: MasOptions) -> None:
    ref = mas_scores_from_tensors(f, t, q, prev)
    got = kernel.scores(f, t, q, prev)
    scale = max(ref.saliency_max, 1e-300)
    err = np.abs(got.saliency - ref.saliency) / scale
    assert err.max() <= SCORE_RTOL, f"saliency: max rel err {err.max():.3g}, mean {err.mean():.3g}"
    err = np.abs(got.relevance - ref.relevance)
    assert err.max() <= SCORE_RTOL, f"relevance: max abs err {err.max():.3g}, mean {err.mean():.3g}"
    if prev is not None:
        err = np.abs(got.change - ref.change) / np.maximum(np.abs(ref.change), 1e-12)
        assert err.max() <= SCORE_RTOL, f"change: max rel err {err.max():.3g}, mean {err.mean():.3g}"
    assert abs(got.saliency_max - ref.saliency_max) <= SCORE_RTOL * scale and abs(got.grounding - ref.grounding) <= SCORE_RTOL
    a, b = mas_from_scores(ref, opts), mas_from_scores(got, opts)
    assert np.array_equal(a.keep.indices, b.keep.indices), f"keep-sets differ: {a.keep.indices} vs {b.keep.indices}"
    assert a.values == b.values


@pytest.fixture(scope="module", params=["nvrtc", "nvcc-fatbin"])
def kernel(request):
    if GPU_REASON is not None:
        pytest.skip(f"no usable CUDA GPU: {GPU_REASON}")
    k = CudaMas(kernel_image=request.getfixturevalue("fatbin") if request.param == "nvcc-fatbin" else None)
    yield k
    k.close()


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (64, 128, 128, 3), (64, 64, 64, 1), (576, 1024, 4096, 6), (37, 5, 9, 2)])
def test_kernel_matches_reference_on_random_inputs(kernel, shape):
    n, dv, d, m = shape
    rng = np.random.default_rng(n * 7 + dv)
    f = rng.normal(size=(n, dv)).astype(np.float32)
    f[: n // 5] += 3.0  # an "object"
    t = rng.normal(size=(n, d)).astype(np.float32)
    t[n // 2 :] = t[0]  # exact duplicates: ties are broken by index on both paths
    q = rng.normal(size=(m, d)).astype(np.float32)
    prev = t + 0.01 * rng.normal(size=t.shape).astype(np.float32)
    for opts in (MasOptions(keep_ratio=0.25), MasOptions(keep_ratio=0.125, rule="mass"), MasOptions(relevance_weight=1.0)):
        _compare(kernel, f, t, q, prev, opts)
        _compare(kernel, f, t, q, None, opts)


@needs_gpu
@pytest.mark.gpu
def test_kernel_matches_reference_on_real_encodings(kernel, edge_bundle_dir, easyvqa_test):
    from msao.engines.bundle import load_bundle
    from msao.engines.generation import Generator
    from msao.engines.mas_text import QuestionEmbedder
    from msao.engines.onnxruntime_backend import OnnxRuntimeBackend, OrtOptions

    gen = Generator(load_bundle(edge_bundle_dir), OnnxRuntimeBackend(OrtOptions(threads=1)))
    embed = QuestionEmbedder(gen)
    try:
        prev = None
        for i in range(40):
            enc = gen.encode_image(gen.pixels_from_bytes(easyvqa_test.image_pngs[easyvqa_test.image_ids[i]]))
            q = embed(easyvqa_test.questions[i])
            _compare(kernel, enc.mas_features, enc.tokens, q.embeddings, prev, MasOptions(keep_ratio=0.25))
            prev = enc.tokens
    finally:
        gen.close()


@needs_gpu
@pytest.mark.gpu
def test_kernel_refuses_inputs_beyond_shared_memory(kernel):
    from msao.errors import MasInputError

    big = np.ones((20000, 4), np.float32)
    with pytest.raises(MasInputError, match="shared memory"):
        kernel.scores(big, big, big[:1])
