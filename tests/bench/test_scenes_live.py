"""bench/scenes_live.py on the easy-VQA pair, a few questions over a real broker and worker: it runs and reports every policy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.scenes_live import main

ORIN_NX = Path(__file__).resolve().parents[2] / "bench" / "profiles" / "dilation_orin-nx_vs_a100.toml"


def test_the_live_benchmark_asks_every_question_once_per_policy_and_reports_what_went_up(
    tmp_path, edge_bundle_dir, cloud_bundle_dir, calibration
):
    from msao.edge_runtime.calibration import save_calibration

    save_calibration(calibration, tmp_path / "cal.json")
    out = tmp_path / "live.json"
    rc = main(["--edge", str(edge_bundle_dir), "--cloud", str(cloud_bundle_dir), "--dataset", "easy-vqa", "--calibration", str(tmp_path / "cal.json"),
               "--links", "wifi", "--questions", "4", "--policies", "cloud_only,msao,edge_only,speculative", "--out", str(out),
               "--edge-dilation-profile", str(ORIN_NX)])  # fmt: skip
    assert rc == 0 and out.with_suffix(".png").stat().st_size > 0
    result = json.loads(out.read_text())
    assert result["regime"] == "large_on_edge = false" and result["policies"] == ["cloud_only", "msao", "edge_only", "speculative"]
    assert result["dilation"] == {"image_decode": 3.0, "vision": 9.9, "mas": 2.4, "prefill": 18.2, "decode": 5.1}  # the results say how slow
    cells = result["cells"]["wifi"]
    assert all(c["requests"] == 4 and c["errors"] == 0 for c in cells.values())
    assert cells["cloud_only"]["uploads"] == {"file": 4} and cells["cloud_only"]["uplink_bytes_per_request"] > 0
    assert cells["edge_only"]["uploads"] == {"-": 4} and cells["edge_only"]["uplink_bytes_per_request"] == 0
    assert cells["speculative"]["plans"] == {"speculative": 4} and cells["speculative"]["blocks_mean"] >= 1  # its verdicts, counted
    assert cells["edge_only"]["blocks_mean"] == 0 and cells["edge_only"]["edge_compute_ms_p50"] > 0


def test_bad_flags_get_usage_and_a_calibration_of_another_dataset_is_refused(tmp_path, calibration, capsys):
    from msao.edge_runtime.calibration import save_calibration

    with pytest.raises(SystemExit):
        main(["--calibration", "x.json", "--policies", "cloud_only"])
    assert "two or more" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--calibration", "x.json", "--edge-dilation", "4", "--edge-dilation-profile", str(ORIN_NX)])
    assert "not both" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--calibration", "x.json", "--edge-dilation-profile", str(tmp_path / "none.toml")])
    assert "no dilation profile" in capsys.readouterr().err
    save_calibration(calibration, tmp_path / "cal.json")  # an easy-VQA calibration
    with pytest.raises(SystemExit, match="calibrated on easy-vqa, not scenes"):
        main(["--calibration", str(tmp_path / "cal.json"), "--dataset", "scenes", "--questions", "1"])
