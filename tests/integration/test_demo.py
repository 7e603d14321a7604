"""`caslie demo` end to end (smaller catalog): every stage runs and summary.json says where every output is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_demo_runs_every_stage_and_its_summary_points_at_every_output(ray_session, tmp_path, capsys):
    from ray_jobs.demo import STAGES, run_demo

    s = run_demo(str(tmp_path / "demo"), records=60, seed=4)
    assert json.loads((tmp_path / "demo" / "summary.json").read_text()) == s
    assert list(s["stages"]) == list(STAGES)
    for name, section in s["stages"].items():
        assert set(section) >= {"output", "files", "config", "command", "figures", "seconds"}, name
        if section["output"]:
            assert Path(section["output"]).is_dir() and section["output"].startswith(str(tmp_path)), name
        for label, path in section["files"].items():
            assert Path(path).exists(), (name, label, path)
        if section["config"]:  # the same job and demo config a cluster user submits
            assert section["command"].startswith(f"caslie {name} {section['config']}")
            assert (Path(__file__).parents[2] / section["config"]).exists()
    figures = {name: section["figures"] for name, section in s["stages"].items()}
    assert figures["catalog"]["records"] == 60 and figures["catalog"]["broken_images"] == 3
    enrich = figures["enrich"]
    assert enrich["records"] == 60 and enrich["ok"] + enrich["partial"] + enrich["failed"] == 60
    assert enrich["partial"] >= 1  # the broken images are accounted for, not dropped
    assert figures["train"]["steps"] > 0 and figures["train"]["loss_last"] < figures["train"]["loss_first"]
    assert figures["evaluate"]["prompts"] > 0
    assert figures["serve"]["status"] in ("ok", "partial") and figures["serve"]["answer"] is not None
    printed = capsys.readouterr().out
    assert "Where everything is:" in printed and str(tmp_path / "demo" / "summary.json") in printed
