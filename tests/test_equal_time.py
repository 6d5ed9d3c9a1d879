"""benchmarks/equal_time.py's smoke path: the same script on a tiny Stable Diffusion built in code."""

import json
import sys

import equal_time  # benchmarks/ is on the path in tests (pyproject: pythonpath)
from test_cli import ROOT


def test_tiny_sd_smoke_run_records_every_step_and_draws_the_plot(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "equal_time"
    results = equal_time.main(["--tiny-sd", "--seeds", "0", "--methods", "sdo", "full", "best_of_n", "zero_order",
                               "--out", str(out)])
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["runs"] == json.loads(json.dumps(results["runs"]))
    assert [r["method"] for r in saved["runs"]] == ["sdo", "full", "best_of_n", "zero_order"]
    for run in saved["runs"]:
        rows = run["rows"]
        assert [r["step"] for r in rows] == [0, 1, 2]  # the unoptimized samples, then 2 optimizer steps
        assert all(a["process_s"] <= b["process_s"] and a["wall_s"] <= b["wall_s"] for a, b in zip(rows, rows[1:]))
        if run["method"] in ("best_of_n", "zero_order"):  # searches keep the lowest loss seen
            assert rows[2]["best_loss"] <= rows[1]["best_loss"]
    image = Image.open(out.with_suffix(".png"))
    assert image.size == (3 * 460, 300)  # one model, three panels (objective, judge, L2)
    # the step-function reading of a trace: the last record at or before the time asked
    rows = saved["runs"][0]["rows"]
    assert equal_time.at(rows, "objective", rows[1]["seconds"]) == rows[1]["objective"]
    assert equal_time.at(rows, "objective", -1.0) == rows[0]["objective"]
