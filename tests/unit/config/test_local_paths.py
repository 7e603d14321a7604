"""Local paths are made absolute where the driver loads its config; URLs, hub ids and tiny ids stay as given."""

import os

from helpers import ROOT

from caslie_core.config import EvaluateConfig, TrainConfig, load_config
from caslie_core.config.paths import absolute_local_paths


def test_relative_local_paths_become_absolute_and_the_rest_stays(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "enriched").mkdir()
    cfg = load_config(
        TrainConfig,
        ROOT / "configs" / "train-caslie-m.yaml",
        ["input.path=enriched", "run.storage_path=s3://b/runs", "output.path=model-out"],
    )
    changed = absolute_local_paths(cfg)
    assert cfg.input.path == str(tmp_path / "enriched") and cfg.output.path == str(tmp_path / "model-out")
    assert cfg.run.storage_path == "s3://b/runs" and cfg.model.model.startswith("mistralai/")  # untouched
    assert changed == {
        "input.path": ("enriched", str(tmp_path / "enriched")),
        "output.path": ("model-out", str(tmp_path / "model-out")),
    }


def test_a_relative_input_that_is_not_here_is_left_for_its_own_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(
        EvaluateConfig,
        ROOT / "configs" / "evaluate-demo.yaml",
        ["model.path=nowhere", "input.path=hf://datasets/x/y", "output.path=out"],
    )
    absolute_local_paths(cfg)
    assert cfg.model.path == "nowhere" and cfg.input.path == "hf://datasets/x/y"
    assert os.path.isabs(cfg.output.path)
