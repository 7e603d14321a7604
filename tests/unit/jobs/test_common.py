"""ray_jobs/common: joining a running local cluster only when it answers, one loader and guard for every job."""

from __future__ import annotations

import socket

import pytest
from helpers import ROOT

from ray_jobs import common


def test_a_running_local_cluster_is_joined_only_when_it_answers(monkeypatch):
    import ray._private.utils as ray_utils

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        live = f"127.0.0.1:{server.getsockname()[1]}"
        monkeypatch.setattr(ray_utils, "read_ray_address", lambda temp_dir=None: live)
        assert common.running_local_cluster() == live
    # the address file outlives a cluster that died without `ray stop`: a stale one is not joined
    monkeypatch.setattr(ray_utils, "read_ray_address", lambda temp_dir=None: live)
    assert common.running_local_cluster() is None
    monkeypatch.setattr(ray_utils, "read_ray_address", lambda temp_dir=None: None)
    assert common.running_local_cluster() is None


@pytest.mark.parametrize("job", ["enrich", "train", "evaluate"])
def test_one_loader_for_every_job_takes_input_and_output_paths(job):
    cfg = common.load_job_config(job, ROOT / "configs" / f"{job}-demo.yaml", ["input.path=/in", "output.path=/out"])
    assert (cfg.input.path, cfg.output.path) == ("/in", "/out")


def test_the_guard_turns_our_errors_into_one_line(capsys):
    from caslie_core.errors import ConfigError

    def bad():
        raise ConfigError(["input.path: required, missing"])

    assert common.run_guarded("train", bad) == 2
    assert "caslie train: error:" in capsys.readouterr().err
