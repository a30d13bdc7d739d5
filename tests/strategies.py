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


# -- cloud bridge codec: arrays of every wire dtype, zero-size and 0-d shapes included ----------
CODEC_DTYPES = ("float64", "float32", "float16", "int64", "int32", "int16", "int8", "uint64", "uint32", "uint16", "uint8", "bool")


@st.composite
def wire_arrays(draw):
    import numpy as np
    from hypothesis.extra import numpy as hnp

    dtype = np.dtype(draw(st.sampled_from(CODEC_DTYPES)))
    shape = tuple(draw(st.lists(st.integers(0, 5), max_size=4)))
    return draw(hnp.arrays(dtype, shape))


wire_tensor_dicts = st.dictionaries(st.from_regex(r"[a-z][a-z0-9_.]{0,15}", fullmatch=True), wire_arrays(), max_size=5)
wire_metadata = st.dictionaries(st.text(max_size=12), st.text(max_size=40), max_size=6)


# -- MAS: token matrices with ties and near-duplicates, and MAS options ----------------------------
@st.composite
def mas_inputs(draw, with_previous: bool | None = None):
    """(mas_features (N, Dv), image_tokens (N, D), question (M, D), previous (N, D) or None), float32.

    Values come from a seeded generator (fast) with drawn shapes; some rows are exact
    duplicates so ties are exercised, and scales span a few orders of magnitude.
    """
    import numpy as np

    n, dv, d, m = draw(st.integers(1, 40)), draw(st.integers(1, 12)), draw(st.integers(1, 12)), draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = 10.0 ** draw(st.integers(-2, 2))
    f = (rng.normal(size=(n, dv)) * scale).astype(np.float32)
    t = (rng.normal(size=(n, d)) * scale).astype(np.float32)
    dups = draw(st.integers(0, n // 2))
    if dups:
        src, dst = rng.integers(n, size=dups), rng.integers(n, size=dups)
        f[dst], t[dst] = f[src], t[src]
    q = rng.normal(size=(m, d)).astype(np.float32)
    prev = None
    if with_previous or (with_previous is None and draw(st.booleans())):
        prev = (t + rng.normal(size=t.shape).astype(np.float32) * scale * 0.1 * (rng.random((n, 1)) < 0.5)).astype(np.float32)
    return f, t, q, prev


@st.composite
def mas_options(draw):
    from msao.engines.mas import KEEP_RULES, MasOptions

    return MasOptions(
        keep_ratio=draw(st.floats(0.01, 1.0)),
        rule=draw(st.sampled_from(KEEP_RULES)),
        mass_share=draw(st.floats(0.05, 1.0)),
        min_keep=draw(st.integers(1, 8)),
        relevance_weight=draw(st.floats(0.0, 1.0)),
        object_threshold=draw(st.floats(0.01, 0.99)),
    )


# -- bad input: JSON of any shape, requests with known keys and wrong values, byte mutations -------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=16,
)
REQUEST_KEYS = ("request_id", "question", "image", "stream", "deadline_ms", "policy", "split_layer", "keep_ratio", "context")


@st.composite
def request_docs(draw, valid: dict):
    """A JSON request: each known key left out, kept valid, or given any JSON value; sometimes an unknown key (ignored)."""
    doc = {}
    for key in REQUEST_KEYS:
        choice = draw(st.sampled_from(("absent", "valid", "junk")))
        if choice == "junk" or (choice == "valid" and key not in valid):
            doc[key] = draw(json_values)
        elif choice == "valid":
            doc[key] = valid[key]
    doc.update(draw(st.dictionaries(st.text(max_size=8), json_values, max_size=1)))
    return doc


@st.composite
def mutated(draw, seed: bytes):
    """``seed`` with a few byte-level edits: flips, overwrites with boundary values, cuts, inserts, splices of itself."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(("flip", "set", "cut", "insert", "dup", "u64")))
        at = draw(st.integers(0, len(data)))
        if op == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and at < len(data):
            data[at] = draw(st.sampled_from((0, 1, 0x7F, 0x80, 0xFF, ord("{"), ord('"'), ord("["))))
        elif op == "cut":
            del data[at : at + draw(st.integers(1, 64))]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "dup" and data:
            n = draw(st.integers(1, 64))
            data[at:at] = data[at : at + n]
        elif op == "u64":
            data[at : at + 8] = draw(st.sampled_from((2**64 - 1, 2**63, 2**32, 0, 65537))).to_bytes(8, "little")
    return bytes(data)
