"""The commit verifier's reliability diagram and commit share per accuracy floor, as one PNG (``msao calibrate --plot``)."""

from __future__ import annotations

from pathlib import Path

from msao.errors import MissingDependency

__all__ = ["plot_verifier"]


def plot_verifier(pair, path: Path) -> None:
    """Left: held-out score vs share right per bin (the diagonal is perfect calibration). Right: per keep
    ratio, the share of drafts committed at each accuracy floor below the large model, verifier vs the
    old lowest-token-probability rule vs the hindsight oracle."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise MissingDependency("--plot needs matplotlib: pip install 'msao[bench]'") from exc
    from msao.cli.calibrate_cmd import FLOORS

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    v = pair.verifier
    left.plot([0, 1], [0, 1], color="0.7", lw=1, label="perfectly calibrated")
    if v is not None and v.reliability:
        xs, ys, ns = zip(*v.reliability)
        left.plot(xs, ys, "o-", color="tab:blue", label=f"verifier (AUROC {v.auroc:.3f}, ECE {v.ece:.3f})")
        for x, y, n in zip(xs, ys, ns):
            left.annotate(str(n), (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7, color="0.4")
    left.set(xlabel="predicted P(draft right)", ylabel="share of drafts right", title="reliability (held-out train questions)",
             xlim=(0, 1), ylim=(0, 1.02))  # fmt: skip
    left.legend(loc="upper left", fontsize=8)
    width = 0.8 / max(1, len(pair.keep_ratios))
    for i, r in enumerate(pair.keep_ratios):
        a = pair.row(r)
        xs = [k + i * width for k in range(len(FLOORS))]
        large = pair.large_accuracy[a]
        right.bar(xs, [pair.commit_at_floor(r, large - f) for f in FLOORS], width, label=f"verifier, keep {r:g}")
        if pair.confidence_commit_share:
            right.scatter(xs, [pair.commit_at_floor(r, large - f, confidence_rule=True) for f in FLOORS], color="k", marker="_", s=80,
                          label="old rule" if i == 0 else None)  # fmt: skip
        if pair.oracle_commit_share:
            right.axhline(pair.oracle_commit_share[a], color=f"C{i}", ls=":", lw=1)
    right.set_xticks([k + 0.4 - width / 2 for k in range(len(FLOORS))], [f"-{f * 100:g} pt" for f in FLOORS])
    right.set(xlabel="accuracy floor below the large model", ylabel="share of drafts committed", ylim=(0, 1),
              title="commit share (dotted: hindsight oracle)")  # fmt: skip
    right.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
