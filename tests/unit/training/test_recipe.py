"""The LoRA recipe on CPU without Ray: steps, reports, checkpoints, learning, and exact resume.

The recipe is fed numpy micro-batches built here from a dozen tokenized (prompt, response) pairs, and
reports through a plain function. One uninterrupted run is shared by the tests (module fixture); the
resume test restarts from a copy of its mid-epoch checkpoint and must retrace the same steps.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT

PAIRS = [
    (f"Review of the {color} {noun}: it is {word}. Choose the sentiment. A: positive B: neutral C: negative", answer)
    for color, noun in [("red", "mug"), ("blue", "kite"), ("green", "phone"), ("black", "helmet")]
    for word, answer in [("great", "A"), ("okay", "B"), ("broken", "C")]
]  # 12 examples: batch 4 -> 3 micro-batches per epoch
BATCH, EPOCHS, EVERY = 4, 3, 2
MID = 4  # a checkpoint inside epoch 1 (after its first micro-batch)


def _config(tmp: Path):
    from caslie_core.config import TrainConfig, load_config

    return load_config(
        TrainConfig,
        ROOT / "configs" / "train-demo.yaml",
        [
            f"input.path={tmp}",
            f"output.path={tmp / 'out'}",
            f"run.storage_path={tmp / 'runs'}",
            f"checkpoint.every_steps={EVERY}",
            f"optim.batch_size={BATCH}",
            f"optim.epochs={EPOCHS}",
            "optim.grad_accum=1",
            "eval.every_steps=3",
            "eval.max_batches=1",
            "scaling.num_workers=1",
        ],
    )


def _batches(cfg) -> list[dict]:
    from caslie_core.models.loading import load_tokenizer
    from caslie_core.training.data import tokenize_example

    tok = load_tokenizer(cfg.model.model, padding_side="right")
    examples = [tokenize_example(tok, p, r, cfg.data.max_length) for p, r in PAIRS]
    out = []
    for start in range(0, len(examples), BATCH):
        chunk = examples[start : start + BATCH]
        ids, labels = np.empty(len(chunk), dtype=object), np.empty(len(chunk), dtype=object)
        ids[:], labels[:] = [x for x, _, _ in chunk], [y for _, y, _ in chunk]
        out.append({"input_ids": ids, "labels": labels, "truncated": np.array([t for _, _, t in chunk])})
    return out


def _total_steps(cfg) -> int:
    from caslie_core.training.recipe import steps_per_epoch

    o = cfg.optim
    return EPOCHS * steps_per_epoch(len(PAIRS), num_workers=1, batch_size=o.batch_size, grad_accum=o.grad_accum)


def _recipe(cfg, report):
    from caslie_core.training.recipe import LoRARecipe

    recipe = LoRARecipe(cfg, total_steps=_total_steps(cfg), report=report)
    recipe.setup()
    return recipe


class Reports:
    """The `report(metrics, folder)` callable: keeps the metrics, what each checkpoint held, and copies."""

    def __init__(self, copy_at: dict[int, Path] | None = None) -> None:
        self.metrics: list[dict] = []
        self.checkpoints: dict[int, dict] = {}
        self.copy_at = copy_at or {}

    def __call__(self, metrics: dict, folder: str | None) -> None:
        self.metrics.append(dict(metrics))
        if folder is None:
            return
        d = Path(folder)
        step = metrics["step"]
        self.checkpoints[step] = {
            "files": sorted(p.name for p in d.iterdir()),
            "adapter": (d / "adapter" / "adapter_config.json").exists(),
            "state": json.loads((d / "trainer_state.json").read_text()),
        }
        if step in self.copy_at:  # the folder is a temp dir removed after this call
            shutil.copytree(d, self.copy_at[step])


@pytest.fixture(scope="module")
def full_run(tiny_models, tmp_path_factory):
    """One uninterrupted run: fresh start, eval before and after training, a copy of the step-MID checkpoint."""
    tmp = tmp_path_factory.mktemp("recipe")
    cfg = _config(tmp)
    batches = _batches(cfg)
    reports = Reports(copy_at={MID: tmp / f"ckpt-{MID}"})
    recipe = _recipe(cfg, reports)
    recipe.load_checkpoint(None)
    before = recipe.evaluate(batches)
    epochs_asked: list[int] = []

    def train_batches(epoch):
        epochs_asked.append(epoch)
        return iter(batches)

    state = recipe.train(train_batches, lambda: iter(batches[:1]))
    after = recipe.evaluate(batches)
    recipe.cleanup()
    return {
        "cfg": cfg,
        "batches": batches,
        "reports": reports,
        "state": state,
        "before": before,
        "after": after,
        "epochs": epochs_asked,
        "copy": tmp / f"ckpt-{MID}",
    }


def test_fresh_run_reports_checkpoints_and_learns(full_run):
    cfg, reports, state = full_run["cfg"], full_run["reports"], full_run["state"]
    total = _total_steps(cfg)
    assert total == 9 and state["step"] == total and state["finished"]
    assert full_run["epochs"] == [0, 1, 2]
    assert [h["step"] for h in state["history"]] == list(range(1, total + 1))
    assert len(state["attempts"]) == 1 and state["attempts"][0]["start_step"] == 0
    # a report at every checkpoint step, every eval step and the end; a folder at every checkpoint and the end
    ckpt_steps = sorted({s for s in range(1, total + 1) if s % EVERY == 0} | {total})
    eval_steps = {s for s in range(1, total + 1) if s % cfg.eval.every_steps == 0} | {total}
    assert [m["step"] for m in reports.metrics] == sorted(set(ckpt_steps) | eval_steps)
    assert sorted(reports.checkpoints) == ckpt_steps
    for m in reports.metrics:
        assert {"step", "epoch", "train_loss", "lr", "tokens"} <= set(m) and np.isfinite(m["train_loss"])
        assert ("eval_loss" in m) == (m["step"] in eval_steps)
        assert m["train_loss"] == pytest.approx(state["history"][m["step"] - 1]["loss"])
    for step, ck in reports.checkpoints.items():
        assert ck["adapter"] and {"trainable.pt", "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= set(
            ck["files"]
        )
        assert ck["state"]["step"] == step and len(ck["state"]["history"]) == step
    assert reports.checkpoints[total]["state"]["finished"]
    # it learns: the training loss falls over the epochs, and the loss on the same data after training is lower
    losses = [h["loss"] for h in state["history"]]
    assert losses[-1] < losses[0]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    assert full_run["after"] < full_run["before"]
    assert state["tokens"] == EPOCHS * sum(len(x) for b in full_run["batches"] for x in b["input_ids"])


def test_resume_from_a_mid_epoch_checkpoint_continues_where_it_stopped(full_run):
    cfg, batches, copy = full_run["cfg"], full_run["batches"], full_run["copy"]
    saved = json.loads((copy / "trainer_state.json").read_text())
    assert saved["step"] == MID and (saved["epoch"], saved["micro_in_epoch"]) == (1, 1)
    reports = Reports()
    recipe = _recipe(cfg, reports)
    recipe.load_checkpoint(str(copy))
    assert recipe.state["step"] == MID
    asked: list[int] = []
    state = recipe.train(lambda epoch: asked.append(epoch) or iter(batches), lambda: iter(batches[:1]))
    recipe.cleanup()
    total = _total_steps(cfg)
    assert asked == [1, 2]  # the interrupted epoch is finished, not restarted
    assert state["step"] == total and state["finished"]
    assert len(state["attempts"]) == 2 and [a["start_step"] for a in state["attempts"]] == [0, MID]
    assert [h["step"] for h in state["history"]] == list(range(1, total + 1))
    assert [m["step"] for m in reports.metrics][0] > MID and sorted(reports.checkpoints)[-1] == total
    # exact resume: adapter, optimizer, scheduler and data position restored -> the same steps as without the stop
    full = full_run["state"]["history"]
    for resumed, uninterrupted in zip(state["history"][MID:], full[MID:]):
        assert resumed["lr"] == pytest.approx(uninterrupted["lr"])
        assert resumed["loss"] == pytest.approx(uninterrupted["loss"], rel=1e-4)
