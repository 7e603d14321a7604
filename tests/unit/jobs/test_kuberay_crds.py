"""cluster/kuberay/ against the real KubeRay v1 CRD schemas (vendored in tests/kuberay/, v1.7.0, see SOURCE.md),
strictly (a field the CRD does not declare is an error: the API server would prune it and our setting would be
silently lost), and against the operator's validation rules we can state (tests/kuberay/RULES.md)."""

from __future__ import annotations

import copy
import json
import re
from functools import cache

import pytest
import yaml
from helpers import ROOT

CRDS = ROOT / "tests" / "kuberay"
KUBERAY = ROOT / "cluster" / "kuberay"
MANIFESTS = ["raycluster.yaml", "rayjob-enrich.yaml", "rayjob-train.yaml", "rayservice.yaml"]
NAME_LIMITS = {"RayCluster": 53, "RayJob": 47, "RayService": 47}  # validation.go: generated names must fit


def _strict(schema: dict) -> dict:
    """The schema with `additionalProperties: false` wherever an object lists its properties (and does not
    preserve unknown fields): Kubernetes prunes undeclared fields, so for us they are errors."""
    node = copy.deepcopy(schema)

    def walk(n):
        if isinstance(n, dict):
            if (
                n.get("type") == "object"
                and "properties" in n
                and "additionalProperties" not in n
                and not n.get("x-kubernetes-preserve-unknown-fields")
            ):
                n["additionalProperties"] = False
            for v in n.values():
                walk(v)
        elif isinstance(n, list):
            for v in n:
                walk(v)

    walk(node)
    return node


@cache
def _validator(kind: str):
    import jsonschema

    schema = json.loads((CRDS / f"{kind.lower()}.schema.json").read_text())
    return jsonschema.Draft7Validator(_strict(schema))


def _doc(name: str) -> dict:
    return yaml.safe_load((KUBERAY / name).read_text())


def _errors(doc: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in _validator(doc["kind"]).iter_errors(doc)]


def test_the_vendored_crds_say_where_they_come_from():
    source = (CRDS / "SOURCE.md").read_text()
    assert "v1.7.0" in source and "59d663aeec13760646da3db9c1cf8cfe883e30b7" in source
    props = json.loads((CRDS / "raycluster.schema.json").read_text())["properties"]["spec"]["properties"]
    assert props["authOptions"]["properties"]["mode"]["enum"] == ["disabled", "token"]


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_passes_its_crd_schema_strictly(name):
    assert _errors(_doc(name)) == []


def test_the_strict_check_catches_what_the_api_server_would_drop():
    doc = _doc("raycluster.yaml")
    doc["spec"]["authOption"] = {"mode": "token"}  # a typo: pruned by Kubernetes, auth silently off
    doc["spec"]["workerGroupSpecs"][0]["maxReplica"] = 4
    errors = " ".join(_errors(doc))
    assert "'authOption' was unexpected" in errors and "'maxReplica' was unexpected" in errors


def _clusters(doc: dict) -> list[dict]:
    spec = doc["spec"]
    return [
        c
        for c in (spec if doc["kind"] == "RayCluster" else spec.get("rayClusterSpec") or spec.get("rayClusterConfig"),)
        if c
    ]


def operator_rule_violations(doc: dict) -> list[str]:
    """The operator's rules (validation.go, KubeRay v1.7.0) that our manifests could break; messages quoted."""
    out, spec, kind = [], doc["spec"], doc["kind"]
    name = doc["metadata"]["name"]
    if len(name) > NAME_LIMITS[kind] or not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name):
        out.append(f"metadata.name {name!r}: not a DNS-1035 label of at most {NAME_LIMITS[kind]} characters")
    if kind == "RayJob":
        selector = spec.get("clusterSelector")
        mode = spec.get("submissionMode", "K8sJobMode")
        if mode not in ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"):
            out.append(f"submissionMode {mode!r} is not one the operator knows")
        if selector is not None and spec.get("backoffLimit", 0) > 0:
            out.append("The RayJob spec is invalid: BackoffLimit is incompatible with ClusterSelector mode")
        if selector is not None and not selector.get("ray.io/cluster"):
            out.append("cluster name in ClusterSelector should not be empty")
        if selector is None and not spec.get("rayClusterSpec"):
            out.append("The RayJob spec is invalid: one of RayClusterSpec or ClusterSelector must be set")
        if spec.get("ttlSecondsAfterFinished", 0) > 0 and not spec.get("shutdownAfterJobFinishes"):
            out.append("a RayJob with shutdownAfterJobFinishes set to false cannot have TTLSecondsAfterFinished")
    if kind == "RayService":
        strategy = (spec.get("upgradeStrategy") or {}).get("type")
        if strategy not in (None, "NewClusterWithIncrementalUpgrade", "NewCluster", "None"):
            out.append(f"upgradeStrategy.type {strategy!r} is not valid")
        ports = spec["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0].get("ports", [])
        if not any(p.get("name", "").startswith("serve") for p in ports):
            out.append("the head container has no port named serve")
    for c in _clusters(doc):
        auth = c.get("authOptions") or {}
        if auth.get("mode") == "token":
            major, minor = (int(x) for x in c["rayVersion"].split(".")[:2])
            if (major, minor) < (2, 52):
                out.append(f"authOptions.mode is 'token' but minimum Ray version is 2.52.0, got {c['rayVersion']}")
        if not c["headGroupSpec"]["template"]["spec"].get("containers"):
            out.append("headGroupSpec should have at least one container")
        names = [g["groupName"] for g in c.get("workerGroupSpecs", [])]
        if len(names) != len(set(names)):
            out.append("worker group names must be unique")
        for g in c.get("workerGroupSpecs", []):
            if g.get("minReplicas", 0) > g.get("maxReplicas", 2**31):
                out.append(f"worker group {g['groupName']} has minReplicas greater than maxReplicas")
            limits = g["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
            params = g.get("rayStartParams", {})
            if "resources" in g and any(k in params for k in ("num-cpus", "num-gpus", "memory")):
                out.append(f"worker group {g['groupName']}: resources in both rayStartParams and resources")
            assert limits, g["groupName"]
        ports = c["headGroupSpec"]["template"]["spec"]["containers"][0].get("ports", [])
        if ports and not any(p.get("name") == "dashboard" for p in ports):
            out.append("the head lists ports but none named dashboard: the operator cannot reach the dashboard")
    return out


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_passes_the_operators_rules(name):
    assert operator_rule_violations(_doc(name)) == []


def test_the_rules_catch_the_defects_found_against_the_operator():
    job = _doc("rayjob-enrich.yaml")
    job["spec"]["backoffLimit"] = 2
    assert "BackoffLimit is incompatible with ClusterSelector mode" in " ".join(operator_rule_violations(job))
    cluster = _doc("raycluster.yaml")
    cluster["spec"]["rayVersion"] = "2.49.0"
    assert "minimum Ray version is 2.52.0" in " ".join(operator_rule_violations(cluster))


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayservice.yaml"])
def test_token_auth_goes_through_the_operator(name):
    """authOptions, not hand-set env: only then do the operator's dashboard client, the autoscaler sidecar and
    the job submitter get the token. The Secret's key is the operator's `auth_token`."""
    doc = _doc(name)
    (cluster,) = _clusters(doc)
    assert cluster["authOptions"] == {"mode": "token", "secretName": "caslie-ray-token"}
    text = (KUBERAY / name).read_text()
    assert "RAY_AUTH_TOKEN\n" not in text and "name: RAY_AUTH_MODE" not in text
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:  # the image's uid 1000 can write the shared cache
        assert pod["securityContext"]["fsGroup"] == 1000
        claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
        assert claims == ["caslie-model-cache"]


def test_the_model_cache_claim_is_defined_read_write_many():
    pvc = _doc("pvc-model-cache.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["metadata"]["name"] == "caslie-model-cache"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"] and pvc["spec"]["storageClassName"] == "STORAGE_CLASS"
