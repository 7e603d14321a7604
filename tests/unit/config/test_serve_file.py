"""A Serve config file means the same to `caslie serve` as to `serve deploy`: http_options, `deployments:` and
`logging_config` are folded into our args with Serve's precedence, and what caslie serve cannot apply is named."""

from __future__ import annotations

import pytest
import yaml
from helpers import ROOT

from caslie_core.config import ServeConfig, load_config, read_yaml
from caslie_core.errors import ConfigError


def _file(tmp_path, mutate) -> str:
    data = read_yaml(ROOT / "configs" / "serve-demo.yaml")
    mutate(data, data["applications"][0])
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_deployments_section_wins_over_args_field_by_field_and_overrides_win_over_both(tmp_path):
    def mutate(data, app):
        app["args"]["model"]["deployment"] = {"num_cpus": 3, "max_ongoing_requests": 7}
        data["http_options"]["port"] = 8123

    path = _file(tmp_path, mutate)
    cfg = load_config(ServeConfig, path)
    d = cfg.model.deployment
    assert d.num_cpus == 0.25  # the file's ray_actor_options replaced the args' value
    assert d.max_ongoing_requests == 7  # a field the deployments entry does not name stays as args set it
    assert d.autoscaling.max_replicas == 2 and d.batching.max_batch_size == 16
    assert cfg.judges[0].deployment.batching.max_batch_size == 32
    assert cfg.judges[0].deployment.batching.wait_timeout_s == 0.01  # user_config replaced whole: defaults
    assert cfg.http.ingress.num_cpus == 0.1 and cfg.http.ingress.max_queued_requests == 128
    assert cfg.http.port == 8123 and cfg.http.host == "127.0.0.1"  # where Serve binds: http_options
    tuned = load_config(ServeConfig, path, ["model.deployment.num_cpus=0.5", "http.port=9000"])
    assert tuned.model.deployment.num_cpus == 0.5 and tuned.http.port == 9000


def test_logging_config_json_turns_on_json_logs(tmp_path):
    path = _file(tmp_path, lambda data, app: app.update(logging_config={"encoding": "JSON"}))
    assert load_config(ServeConfig, path).ray.log_format == "json"
    assert load_config(ServeConfig, ROOT / "configs" / "serve-demo.yaml").ray.log_format == "text"


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda d, a: a["deployments"].append({"name": "Judge_nobody"}), "deployments[5].name='Judge_nobody'"),
        (lambda d, a: a["deployments"][0].update(num_replicas=3), "deployments[0] (Ingress).num_replicas"),
        (
            lambda d, a: a["deployments"][1].update(ray_actor_options={"num_cpus": 1, "memory": 9}),
            "ray_actor_options: caslie serve applies num_cpus and num_gpus only (got ['memory'])",
        ),
        (lambda d, a: a["deployments"][1].update(user_config={"batch": 3}), "user_config={'batch': 3}"),
        (lambda d, a: a["args"]["http"].update(port=9999), "args.http.port=9999 disagrees with http_options.port"),
        (
            lambda d, a: a["deployments"][1].update(autoscaling_config={"min_replicas": 3, "max_replicas": 1}),
            "min_replicas (3) must be <= max_replicas (1)",
        ),
    ],
)
def test_what_caslie_serve_cannot_apply_is_named(tmp_path, mutate, needle):
    with pytest.raises(ConfigError) as e:
        load_config(ServeConfig, _file(tmp_path, mutate))
    assert needle in str(e.value), str(e.value)


def test_shipped_serve_configs_tune_in_deployments_not_in_args():
    """Serve hashes `args` into the code version: tuning there would restart every GPU replica."""
    files = sorted((ROOT / "configs").glob("serve-*.yaml"))
    embedded = yaml.safe_load(
        yaml.safe_load((ROOT / "cluster" / "kuberay" / "rayservice.yaml").read_text())["spec"]["serveConfigV2"]
    )
    for data in [read_yaml(p) for p in files] + [embedded]:
        app = data["applications"][0]
        args = app["args"]
        assert "host" not in args["http"] and "port" not in args["http"] and "ingress" not in args["http"]
        assert all("deployment" not in args[k] for k in ("model", "captioner"))
        assert all("deployment" not in j for j in args["judges"])
        names = {d["name"] for d in app["deployments"]}
        if args.get("layout") == "colocated":
            assert names == {"Ingress", "Models"}
        else:
            assert names == {"Ingress", "Predictor", "Captioner"} | {f"Judge_{j['name']}" for j in args["judges"]}


def test_the_deployments_section_follows_the_layout(tmp_path):
    def colocated(data, app):
        app["args"]["layout"] = "colocated"
        app["deployments"] = [{"name": "Models", "ray_actor_options": {"num_cpus": 0.5}}]

    cfg = load_config(ServeConfig, _file(tmp_path, colocated))
    assert cfg.layout == "colocated" and cfg.model.deployment.num_cpus == 0.5

    def panel(data, app):
        app["args"]["layout"] = "panel"
        app["deployments"] = [{"name": "Panel", "user_config": {"batching": {"max_batch_size": 3}}}]

    assert load_config(ServeConfig, _file(tmp_path, panel)).panel.batching.max_batch_size == 3

    def single(data, app):  # the models live in the Ingress replica: its entry sizes and batches them
        app["args"]["layout"] = "single"
        app["deployments"] = [{"name": "Ingress", "ray_actor_options": {"num_cpus": 2}, "user_config": {}}]

    cfg = load_config(ServeConfig, _file(tmp_path, single))
    assert cfg.layout == "single" and cfg.model.deployment.num_cpus == 2
    assert cfg.model.deployment.options("Ingress", 1)["user_config"]["batching"]["wait_timeout_s"] == 0.01

    def stale(data, app):
        app["args"]["layout"] = "colocated"  # the split layout's Captioner is not a deployment of this app

    with pytest.raises(ConfigError, match="deployments\\[1\\].name='Predictor' is not a deployment"):
        load_config(ServeConfig, _file(tmp_path, stale))
