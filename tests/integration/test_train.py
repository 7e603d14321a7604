"""The training job end to end on Ray Train: it learns, checkpoints reload, reruns resume, killed workers restart."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from helpers import checkpoint_registered, steps_logged, train_config

pytestmark = pytest.mark.slow


def _held_out(catalog, n=None):
    from caslie_core.training.data import training_example

    rows = [json.loads(line) for line in open(catalog)]
    exs = [training_example(r) for r in rows if r["split"] in ("test", "ood_test")]
    return exs[:n] if n else exs


def _accuracy(answers, examples) -> float:
    return sum((a.text or "").strip()[:1] == e.response[:1] for a, e in zip(answers, examples)) / len(examples)


def test_the_adapter_learns_the_rules(trained):
    from caslie_core.models.predictor import Predictor

    s = trained["summary"]
    assert s["steps"] == s["planned_steps"] > 100
    assert s["restarts"] == 0
    curve = s["loss_curve"]
    assert curve["steps"] == list(range(1, s["steps"] + 1))
    assert curve["last"] < 0.25 * curve["first"]
    assert s["eval_loss"] is not None and s["eval_loss"] < 0.5
    assert s["tokens_per_s"] > 0 and s["data"]["train_rows_used"] > 750
    examples = _held_out(trained["catalog"])
    prompts = [e.prompt for e in examples]
    tuned = Predictor("tiny:lm", adapter=s["adapter"], max_new_tokens=4, batch_size=64)
    base = Predictor("tiny:lm", max_new_tokens=4, batch_size=64)
    tuned_acc, base_acc = _accuracy(tuned.answer(prompts), examples), _accuracy(base.answer(prompts), examples)
    assert tuned_acc >= 0.9, tuned_acc
    assert base_acc < 0.5, base_acc


def test_training_steps_reach_rays_metrics_endpoint(trained):
    """The steps counter outlives the workers; the loss and tokens/s gauges live with them, so the killed-worker
    test below reads those while its training runs."""
    from helpers import scrape_metrics

    found = scrape_metrics(["caslie_train_steps_total"])
    steps = sum(float(line.rsplit(" ", 1)[1]) for line in found["caslie_train_steps_total"])
    assert steps >= trained["summary"]["steps"]


def test_output_is_a_standard_peft_adapter_and_the_checkpoint_gives_the_same_answers(trained, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from caslie_core.models.ids import resolve_model
    from caslie_core.models.predictor import Predictor

    s = trained["summary"]
    adapter = Path(s["adapter"])
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in adapter.iterdir()}
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["r"] == 16 and cfg["peft_type"] == "LORA"
    assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    # loads with plain PEFT outside Ray
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(resolve_model("tiny:lm")), str(adapter))
    assert any("lora_A" in n for n, _ in model.named_parameters())
    out = Path(trained["cfg"].output.path)
    assert (out / "resolved_config.yaml").exists() and (out / "summary.json").exists()
    # the latest checkpoint in the run's storage (the S3 bucket) answers exactly as the exported adapter
    assert trained["cfg"].run.storage_path.startswith("s3://") and s["checkpoint"].startswith(_bucket(trained))
    local = tmp_path / "checkpoint"
    _s3().get(s["checkpoint"], str(local), recursive=True)
    examples = _held_out(trained["catalog"], 60)
    prompts = [e.prompt for e in examples]
    a = [x.text for x in Predictor("tiny:lm", adapter=str(adapter), max_new_tokens=4).answer(prompts)]
    b = [x.text for x in Predictor("tiny:lm", adapter=str(local / "adapter"), max_new_tokens=4).answer(prompts)]
    assert a == b
    state = json.loads((local / "trainer_state.json").read_text())
    assert state["step"] == s["steps"] and state["finished"]
    assert {"optimizer.pt", "scheduler.pt", "trainable.pt"} <= {p.name for p in local.iterdir()}
    assert _s3().exists(f"{_bucket(trained)}/runs/learn/checkpoint_manager_snapshot.json")  # Ray Train's record


def _s3():
    import fsspec

    return fsspec.filesystem("s3", skip_instance_cache=True)


def _bucket(trained) -> str:
    return trained["cfg"].run.storage_path.removeprefix("s3://").split("/")[0]


def test_the_step_log_reaches_object_storage(trained):
    """Object storage has no append: rank 0's step log goes up with each report, whole, and at the end."""
    logs = _s3().glob(f"{_bucket(trained)}/runs/learn/progress/steps-*.jsonl")
    assert len(logs) == 1
    steps = [json.loads(line)["step"] for line in _s3().cat(logs[0]).decode().splitlines()]
    assert steps == list(range(1, trained["summary"]["steps"] + 1))


def test_rerunning_the_same_run_name_resumes_instead_of_starting_over(trained):
    from ray_jobs import train

    pattern = f"{_bucket(trained)}/runs/learn/progress/steps-*.jsonl"
    before = sorted(_s3().glob(pattern))
    s = train.run(trained["cfg"])
    assert s["resumed_existing_run"] and not trained["summary"]["resumed_existing_run"]
    assert s["steps"] == trained["summary"]["steps"] == s["planned_steps"]
    assert s["loss_curve"] == trained["summary"]["loss_curve"]
    assert sorted(_s3().glob(pattern)) == before  # picked up at the end from the bucket: no step ran again


def test_a_killed_worker_restarts_from_the_last_checkpoint_fsdp(ray_session, train_catalog, tmp_path, prometheus):
    """FSDP (sharded) on 2 CPU workers; one worker is SIGKILLed mid-run; FailureConfig restarts the group. A real
    Prometheus scrapes the run: every training panel of the shipped dashboard shows it."""
    from helpers import assert_panels_show_data

    from ray_jobs import train

    every, total = 10, 60
    cfg = train_config(
        train_catalog,
        tmp_path,
        "run.name=killed",
        "scaling.strategy=fsdp",
        f"optim.max_steps={total}",
        f"checkpoint.every_steps={every}",
        "eval.enabled=false",
        "run.max_failures=2",
        "optim.batch_size=4",
    )
    progress = tmp_path / "runs" / "killed" / "progress"
    killed = {}

    def killer():
        deadline = time.time() + 240
        while time.time() < deadline and not killed:
            lines = steps_logged(progress.parent)
            pid_file = progress / "worker-rank1.pid"
            # Ray Train registers a reported checkpoint when its controller next polls the workers;
            # kill once one is registered, as a real failure would come later.
            if checkpoint_registered(progress.parent) and lines > every and pid_file.exists():
                killed["pid"] = int(pid_file.read_text())
                killed["after_steps"] = lines
                os.kill(killed["pid"], signal.SIGKILL)
                return
            time.sleep(0.05)

    gauges: dict = {}

    def watch():  # the per-worker gauges, read from Ray's metrics endpoint while the workers are alive
        from helpers import scrape_metrics

        gauges.update(scrape_metrics(["caslie_train_loss", "caslie_train_tokens_per_second"], timeout=120))

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    w = threading.Thread(target=watch, daemon=True)
    w.start()
    start = time.time()
    s = train.run(cfg)
    end = time.time()
    t.join(5)
    w.join(5)
    prometheus.wait_scraped()
    tops = assert_panels_show_data(prometheus, ("Training:",), start, end)
    assert 0 < tops["Training: optimizer steps per minute"][0]
    assert killed, "the test never saw the run get going"
    assert gauges and all(gauges.values()), {n: len(v) for n, v in gauges.items()}
    files = {p.name: len(p.read_text().splitlines()) for p in progress.glob("steps-*.jsonl")}
    assert s["restarts"] >= 1 and s["steps"] == total, (killed, files, s["attempts"])
    assert killed["after_steps"] < total
    # every optimizer step is in the final history once, in order
    assert s["loss_curve"]["steps"] == list(range(1, total + 1))
    # across attempts, only steps after the last checkpoint before the kill were run twice
    runs = [
        json.loads(line)["step"] for p in sorted(progress.glob("steps-*.jsonl")) for line in p.read_text().splitlines()
    ]
    assert set(runs) == set(range(1, total + 1))
    repeated = len(runs) - total
    restart = s["attempts"][1]["start_step"]
    assert restart % every == 0 and restart > 0
    # at most the steps run after the checkpoint it resumed from (the last one Ray Train had registered when
    # the worker died; under load that can be one checkpoint before the newest reported one) + one in flight
    assert 0 <= repeated <= killed["after_steps"] - restart + 1, (killed, files, s["attempts"])
