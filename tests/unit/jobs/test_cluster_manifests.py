"""cluster/: KubeRay manifests and the launcher YAML agree with configs/ and carry no secrets."""

from __future__ import annotations

import shlex

import pytest
import yaml
from helpers import ROOT

from caslie_core.config import JOB_CONFIGS, load_config, read_yaml

KUBERAY = ROOT / "cluster" / "kuberay"


def _load(name: str) -> dict:
    return yaml.safe_load((KUBERAY / name).read_text())


def _gpu_group(spec: dict) -> dict:
    group = next(g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu")
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    return {
        "gpus": int(limits["nvidia.com/gpu"]),
        "cpus": int(limits["cpu"]),
        "max": group["maxReplicas"],
        "min": group["minReplicas"],
        "start_gpus": int(group["rayStartParams"]["num-gpus"]),
        "start_cpus": int(group["rayStartParams"]["num-cpus"]),
    }


def _check_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"].startswith("2.60")
    head = spec["headGroupSpec"]
    assert head["template"]["spec"]["containers"] and "rayStartParams" in head
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] and group["template"]["spec"]["containers"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    g = _gpu_group(spec)
    assert g["gpus"] == g["start_gpus"] and g["cpus"] == g["start_cpus"]
    for c in [head["template"]["spec"]["containers"][0]] + [
        w["template"]["spec"]["containers"][0] for w in spec["workerGroupSpecs"]
    ]:
        env = {e["name"]: e for e in c["env"]}
        assert spec["authOptions"]["mode"] == "token"  # the operator sets RAY_AUTH_MODE/RAY_AUTH_TOKEN from it
        for name, e in env.items():  # secrets come from Secrets, never as literal values
            if any(k in name for k in ("TOKEN", "KEY", "SECRET")):
                assert "valueFrom" in e and "value" not in e, name


def test_raycluster_is_well_formed_and_secure():
    doc = _load("raycluster.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster" and doc["metadata"]["name"]
    _check_cluster_spec(doc["spec"])


@pytest.mark.parametrize("name,job", [("rayjob-enrich.yaml", "enrich"), ("rayjob-train.yaml", "train")])
def test_rayjobs_run_our_entrypoints_with_valid_configs(name, job):
    doc = _load(name)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    assert (
        spec.get("clusterSelector") == {"ray.io/cluster": _load("raycluster.yaml")["metadata"]["name"]}
        or "rayClusterSpec" in spec
    )
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", f"ray_jobs.{job}"] and argv[3] == "--config"
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    load_config(JOB_CONFIGS[job], ROOT / argv[4], overrides)
    yaml.safe_load(spec["runtimeEnvYAML"])


def test_rayservice_serves_the_checked_in_serve_config():
    from ray.serve.schema import ServeDeploySchema

    doc = _load("rayservice.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayService"
    embedded = yaml.safe_load(doc["spec"]["serveConfigV2"])
    assert embedded == read_yaml(ROOT / "configs" / "serve-caslie-m.yaml")
    ServeDeploySchema.model_validate(embedded)
    _check_cluster_spec(doc["spec"]["rayClusterConfig"])
    serving, batch = _gpu_group(doc["spec"]["rayClusterConfig"]), _gpu_group(_load("raycluster.yaml")["spec"])
    assert {k: v for k, v in serving.items() if k != "min"} == {k: v for k, v in batch.items() if k != "min"}
    assert serving["min"] >= 1 and batch["min"] == 0  # a service keeps a GPU node; batch clusters scale to zero
    envs = {
        e["name"] for e in doc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    }
    api_key_env = embedded["applications"][0]["args"]["http"]["api_key_env"]
    assert api_key_env in envs


def _needs(actors: list[tuple[float, float, int, int]]) -> dict:
    """From (GPUs, CPUs, fewest, most) per kind of actor/worker/replica: the largest one, and the GPUs and CPUs
    of all of them at the least and at the most scale."""
    return {
        "gpus_one": max(a[0] for a in actors),
        "cpus_one": max(a[1] for a in actors),
        "gpus_min": sum(a[0] * a[2] for a in actors),
        "gpus_max": sum(a[0] * a[3] for a in actors),
        "cpus_max": sum(a[1] * a[3] for a in actors),
    }


def _gpu_needs() -> dict[str, dict]:
    """config -> what its actors ask of the GPU worker group (`_needs`)."""
    needs = {}
    cfg = load_config(JOB_CONFIGS["enrich"], ROOT / "configs" / "enrich-mmecinstruct.yaml")
    pools = [cfg.captioner.pool] + [j.pool for j in cfg.judges]
    needs["enrich-mmecinstruct"] = _needs([(p.num_gpus, p.num_cpus, p.min_size, p.max_size) for p in pools])
    for size in "sml":
        t = load_config(JOB_CONFIGS["train"], ROOT / "configs" / f"train-caslie-{size}.yaml")
        gpus = (t.scaling.resources_per_worker or {}).get("GPU", 1 if t.scaling.use_gpu else 0)
        n = t.scaling.num_workers
        needs[f"train-caslie-{size}"] = _needs([(gpus, t.scaling.cpus_per_worker, n, n)])
        e = load_config(JOB_CONFIGS["evaluate"], ROOT / "configs" / f"evaluate-caslie-{size}.yaml")
        needs[f"evaluate-caslie-{size}"] = _needs(
            [(e.pool.num_gpus, e.pool.num_cpus, e.pool.min_size, e.pool.max_size)]
        )
    s = load_config(JOB_CONFIGS["serve"], ROOT / "configs" / "serve-caslie-m.yaml")
    deps = [s.model.deployment, s.captioner.deployment, s.http.ingress] + [j.deployment for j in s.judges]
    needs["serve-caslie-m"] = _needs(
        [(d.num_gpus, d.num_cpus, d.autoscaling.min_replicas, d.autoscaling.max_replicas) for d in deps]
    )
    return needs


def test_resource_numbers_agree_with_the_cluster():
    """Every actor fits a worker pod, the least scale fits the group, and so does the most: a pool or deployment
    whose max_size the group can never hold would wait on capacity that cannot come."""
    g = _gpu_group(_load("raycluster.yaml")["spec"])
    for name, n in _gpu_needs().items():
        assert n["gpus_one"] <= g["gpus"], f"{name}: one actor needs more GPUs than a worker pod has"
        assert n["cpus_one"] <= g["cpus"], f"{name}: one actor needs more CPUs than a worker pod has"
        assert n["gpus_min"] <= g["max"] * g["gpus"], f"{name}: needs {n['gpus_min']} GPUs at minimum scale"
        assert n["gpus_max"] <= g["max"] * g["gpus"], f"{name}: {n['gpus_max']} GPUs at its largest scale"
        assert n["cpus_max"] <= g["max"] * g["cpus"], f"{name}: {n['cpus_max']} CPUs at its largest scale"


def test_batch_clusters_scale_to_zero_and_agree_on_the_idle_timeout():
    """The KubeRay cluster and the launcher's: GPU nodes come with work and go after the same idle time."""
    kuberay = _load("raycluster.yaml")["spec"]
    launcher = yaml.safe_load((ROOT / "cluster" / "launcher" / "aws-gpu.yaml").read_text())
    assert kuberay["enableInTreeAutoscaling"] is True
    idle = kuberay["autoscalerOptions"]["idleTimeoutSeconds"]
    assert idle == launcher["idle_timeout_minutes"] * 60
    assert _gpu_group(kuberay)["min"] == launcher["available_node_types"]["gpu"]["min_workers"] == 0


def test_launcher_matches_the_kuberay_worker_group():
    doc = yaml.safe_load((ROOT / "cluster" / "launcher" / "aws-gpu.yaml").read_text())
    g = _gpu_group(_load("raycluster.yaml")["spec"])
    gpu = doc["available_node_types"]["gpu"]
    assert gpu["resources"] == {"CPU": g["cpus"], "GPU": g["gpus"]}
    assert gpu["max_workers"] == g["max"] and gpu["min_workers"] == g["min"]
    assert doc["available_node_types"][doc["head_node_type"]]["resources"] == {"CPU": 0}
    opts = " ".join(doc["docker"]["run_options"])
    assert "-v /mnt/cache:/mnt/cache" in opts and "--shm-size" not in opts  # cache mounted; object store not capped


def test_launcher_passes_rays_own_schema():
    import json
    from pathlib import Path

    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    doc = yaml.safe_load((ROOT / "cluster" / "launcher" / "aws-gpu.yaml").read_text())
    jsonschema.validate(doc, schema)
    bad = {**doc, "idle_timeout_minute": 5}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    assert all(
        "RAY_AUTH_MODE=token" in c
        for c in doc["head_start_ray_commands"] + doc["worker_start_ray_commands"]
        if c.startswith("RAY_AUTH_MODE") or "ray start" in c
    )


def test_runtime_env_holds_no_secrets():
    env = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "."
    secretish = [n for n in env.get("env_vars", {}) if n.endswith(("_TOKEN", "_KEY", "_KEY_ID")) or "SECRET" in n]
    assert not secretish


def _secret_refs(node) -> set[tuple[str, str]]:
    if isinstance(node, dict):
        ref = node.get("secretKeyRef")
        found = {(ref["name"], ref["key"])} if isinstance(ref, dict) else set()
        return found.union(*(_secret_refs(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_secret_refs(v) for v in node))
    return set()


def test_the_readme_creates_every_secret_the_manifests_read():
    import re

    readme = (ROOT / "README.md").read_text()
    created = {
        (m.group(1), key)
        for m in re.finditer(r"kubectl create secret generic (\S+)((?: --from-literal=\S+)+)", readme)
        for key in re.findall(r"--from-literal=([\w.-]+)=", m.group(2))
    }
    wanted = set().union(
        *(
            _secret_refs(list(yaml.safe_load_all((ROOT / "cluster" / "kuberay" / f).read_text())))
            for f in ("raycluster.yaml", "rayjob-enrich.yaml", "rayjob-train.yaml", "rayservice.yaml")
        )
    )
    # the token Secret is read by the operator (authOptions.secretName), always under its key `auth_token`
    wanted |= {
        (_load(f)["spec"].get("rayClusterConfig", _load(f)["spec"])["authOptions"]["secretName"], "auth_token")
        for f in ("raycluster.yaml", "rayservice.yaml")
    }
    assert wanted and wanted <= created, sorted(wanted - created)


def test_the_image_pins_cuda_and_torch_and_installs_dependencies_before_the_source():
    """No Docker here: the Dockerfile is read. Base tag with its CUDA, torch from the matching PyTorch index
    through the constraints file, dependencies before any source COPY, a regular (not editable) install."""
    import re

    lines = [line.strip() for line in (ROOT / "cluster" / "Dockerfile").read_text().splitlines()]
    steps = [line for line in lines if line and not line.startswith("#")]
    base = next(s for s in steps if s.startswith("FROM "))
    cuda = re.fullmatch(r"FROM rayproject/ray:2\.60\.0-py311-cu(\d+)", base)
    assert cuda, base  # a fixed CUDA in the tag, not the floating -gpu
    torch_step = next(s for s in steps if "pip install" in s and " torch" in s)
    assert f"download.pytorch.org/whl/cu{cuda.group(1)}" in torch_step and "-c constraints.txt" in torch_step
    constraints = (ROOT / "cluster" / f"constraints-cu{cuda.group(1)}.txt").read_text()
    makefile = (ROOT / "Makefile").read_text()
    pinned = re.search(r"^torch==(\S+)$", constraints, re.M).group(1)
    assert f"TORCH_VERSION ?= {pinned}" in makefile  # the image runs the torch the tests ran
    # torchvision (the Qwen2-VL/2.5-VL and SmolVLM processors need it) in the same step, from the same index,
    # at the release built for that torch: torch 2.m <-> torchvision 0.(m+15), each pinned
    assert torch_step.split()[-2:] == ["torch", "torchvision"]
    vision = re.search(r"^torchvision==(\d+)\.(\d+)\.\d+$", constraints, re.M)
    major, minor = (int(x) for x in pinned.split(".")[:2])
    assert vision and (int(vision.group(1)), int(vision.group(2))) == (0, minor + 15) and major == 2, vision
    first_source = next(i for i, s in enumerate(steps) if s.startswith("COPY") and "caslie_core" in s)
    deps = next(i for i, s in enumerate(steps) if "-r requirements.txt" in s)
    assert deps < first_source
    assert not any(" -e " in s or "--editable" in s for s in steps)
    assert steps[-2].startswith("RUN pip install") and "--no-deps ." in steps[-2]


def test_setuptools_floor_supports_the_license_expression():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"
    assert "setuptools>=77" in project["build-system"]["requires"]
