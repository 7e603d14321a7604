"""The dashboard, the PodMonitor and the metrics the jobs record agree: every metric of `ray_jobs.metrics`
is charted, every chart reads a metric we record, and the scrape port is the one the Ray pods expose."""

import json
import re

import yaml
from helpers import ROOT

from ray_jobs.metrics import _SPECS


def _exprs():
    dash = json.loads((ROOT / "cluster" / "grafana" / "caslie.json").read_text())
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


def test_every_metric_is_charted_and_every_chart_reads_one_of_ours():
    used = {m for e in _exprs() for m in re.findall(r"ray_(caslie_[a-z_]+?)(?:_bucket)?\b", e)}
    assert used == set(_SPECS), used ^ set(_SPECS)
    for name, (kind, _, _) in _SPECS.items():
        if kind == "Histogram":
            assert any(f"ray_{name}_bucket" in e and "histogram_quantile" in e for e in _exprs()), name


def test_the_podmonitor_scrapes_the_metrics_port_the_ray_pods_expose():
    pm = yaml.safe_load((ROOT / "cluster" / "kuberay" / "podmonitor.yaml").read_text())
    assert pm["apiVersion"] == "monitoring.coreos.com/v1" and pm["kind"] == "PodMonitor"
    port = pm["spec"]["podMetricsEndpoints"][0]["port"]
    assert pm["spec"]["selector"]["matchLabels"] == {"ray.io/is-ray-node": "yes"}
    for manifest in ("raycluster.yaml", "rayservice.yaml"):
        doc = yaml.safe_load((ROOT / "cluster" / "kuberay" / manifest).read_text())
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterConfig"]
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for g in groups:
            ports = {p["name"]: p["containerPort"] for p in g["template"]["spec"]["containers"][0].get("ports", [])}
            assert ports.get(port) == 8080, (manifest, ports)
