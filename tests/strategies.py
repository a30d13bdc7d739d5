"""Hypothesis strategies shared by the tests."""

from __future__ import annotations

from hypothesis import strategies as st

from msao.engines.manifest import DTYPES, FlopsModel, TensorSpec

SYMBOLS = ("batch", "seq", "past")

dims = st.one_of(st.integers(0, 8), st.sampled_from(SYMBOLS))


@st.composite
def tensor_specs(draw, name: str | None = None) -> TensorSpec:
    return TensorSpec(
        name=name or draw(st.from_regex(r"[a-z][a-z0-9_]{0,12}", fullmatch=True)),
        dtype=draw(st.sampled_from(DTYPES)),
        shape=tuple(draw(st.lists(dims, max_size=4))),
    )


flops_models = st.builds(FlopsModel, st.integers(0, 10**12), st.integers(0, 10**9), st.integers(0, 10**6))
