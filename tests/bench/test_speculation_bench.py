"""bench/speculation.py on the easy-VQA pair, a few questions: it runs, and every answer is the cloud model's."""

from __future__ import annotations

import json

from bench.speculation import main


def test_the_speculation_benchmark_reports_every_cell_with_no_mismatch(tmp_path, edge_bundle_dir, cloud_bundle_dir):
    out = tmp_path / "speculation.json"
    rc = main(["--edge", str(edge_bundle_dir), "--cloud", str(cloud_bundle_dir), "--dataset", "easy-vqa", "--limit", "6", "--blocks", "1,3",
               "--out", str(out)])  # fmt: skip
    assert rc == 0 and out.with_suffix(".png").stat().st_size > 0
    result = json.loads(out.read_text())
    assert list(result["cells"]) == ["k=1", "k=3", "adaptive", "daemon (prompt first)"]
    for name, cell in result["cells"].items():
        assert cell["questions"] == 6 and cell["mismatches"] == 0, name
        assert 0 < cell["cloud_passes_per_token"] <= 1.0 and 0 <= cell["acceptance"] <= 1, name
