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


def test_counts_start_series_at_zero_and_hold_the_first_increments_until_the_zero_is_scraped(monkeypatch):
    """Prometheus' rate() skips a series' first sample: a series must be exported at zero before it rises."""
    import time

    from ray_jobs import counters

    seen = []
    monkeypatch.setattr(counters, "_record", lambda name, how, value, tags: seen.append((how, value, tags)))
    c = counters.Counts({"caslie_enrich_records_total": [{"status": "ok"}, {"status": "failed"}]}, hold=0.3)
    assert seen == [("zero", 0.0, {"status": "ok"}), ("zero", 0.0, {"status": "failed"})]
    seen.clear()
    c.add("caslie_enrich_records_total", 5, status="ok")
    c.add("caslie_enrich_records_total", 2, status="ok")
    c.add("caslie_enrich_records_total", 0, status="failed")  # nothing to count: nothing held
    assert seen == []  # held: the zero has not been scraped yet
    time.sleep(0.5)  # the timer records what was held once the hold ends
    assert seen == [("inc", 7.0, {"status": "ok"})]
    c.add("caslie_enrich_records_total", 1, status="ok")
    assert seen[-1] == ("inc", 1, {"status": "ok"})  # after the hold: at once
    seen.clear()
    c.add("caslie_serve_requests_total", 1, route="/v1/enrich", status=404)  # a label set first seen now
    assert seen == [("zero", 0.0, {"route": "/v1/enrich", "status": 404})]
    c.flush()  # the job ends: nothing held is lost
    assert seen[-1] == ("inc", 1.0, {"route": "/v1/enrich", "status": "404"})


def test_batch_size_buckets_read_small_batches_right():
    """histogram_quantile interpolates inside a bucket: a narrow bucket below each small size reads 1 as ~1."""
    from ray_jobs.metrics import _OWN_BOUNDARIES

    b = _OWN_BOUNDARIES["caslie_serve_batch_size"]
    assert b == sorted(b) and len(set(b)) == len(b)
    for n in (1, 2, 3, 4, 8, 16, 32, 64, 128, 256):
        assert n in b and n - 0.001 in b


def test_in_flight_keeps_a_bursts_peak_up_for_a_whole_report_interval(monkeypatch):
    """Ray exports a gauge once per report interval: a burst that ends between two reports still shows."""
    import time

    from ray_jobs import counters

    shown = []
    monkeypatch.setattr(counters, "hold_s", lambda: 1.0)
    monkeypatch.setattr(counters, "set_gauge", lambda name, value: shown.append(value))
    f = counters.InFlight()
    for _ in range(3):
        f.up()
    for _ in range(3):
        f.down()
    f.up()  # a request after the burst: the burst's peak is not hidden by it
    assert shown[-1] == 3 and f.now == 1
    time.sleep(1.3)  # first tick: the burst's interval ends; its peak is still shown through the next one
    assert shown[-1] == 3
    time.sleep(1.0)  # second tick: only what this interval saw
    assert shown[-1] == 1
