"""The LoRA fine-tuning recipe, Ray-free, in the shape of torchtune's recipes.

    recipe = LoRARecipe(cfg, total_steps=plan.total_steps, report=report)
    recipe.setup()                       # base model + LoRA
    recipe.load_checkpoint(folder)       # None or a checkpoint folder; then DDP/FSDP wrap, optimizer, scheduler
    recipe.train(train_batches, eval_batches)
    recipe.cleanup()

Features and their trade-offs:
- gradient accumulation with `no_sync` between micro-batches under DDP (fewer all-reduces);
- FSDP with one unit per decoder layer (large bases; full-state gathers at checkpoints cost time);
- exact resume: a checkpoint holds the position inside the epoch, so a restarted worker group skips the
  micro-batches already trained on instead of repeating them;
- metrics and checkpoints go through one `report(metrics, checkpoint_dir | None)` callable: Ray Train's
  `ray.train.report` in the job, a plain function in tests (every rank calls it; rank 0 passes the folder).

The Ray Train worker (`ray_jobs/train.py`) only feeds it dataset shards and forwards its reports.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..config import TrainConfig
from .data import IGNORE_INDEX, collate
from .distributed import fsdp_full_state, fsdp_optim_to_load, trainable_state, unwrap, wrap_fsdp
from .lora import apply_lora
from .progress import ProgressLog


def micro_batch_loss(model, batch: dict):
    """(summed token cross-entropy over response tokens, number of such tokens)."""
    import torch.nn.functional as F

    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits[:, :-1, :].float()
    target = batch["labels"][:, 1:]
    loss_sum = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss_sum, int((target != IGNORE_INDEX).sum())


def make_optimizer(model, *, lr: float, weight_decay: float, betas=(0.9, 0.999)):
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas)


def make_scheduler(optimizer, *, kind: str, warmup_steps: int, total_steps: int):
    import torch

    total = max(1, total_steps)

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def steps_per_epoch(n_rows: int, *, num_workers: int, batch_size: int, grad_accum: int) -> int:
    """Optimizer steps per epoch when every worker gets n_rows // num_workers rows (equal split)."""
    per_worker = n_rows // max(1, num_workers)
    micro = math.ceil(per_worker / batch_size)
    return math.ceil(micro / grad_accum) if micro else 0


STATE_FILE = "trainer_state.json"
Report = Callable[[dict, "str | None"], None]


def load_model(cfg: TrainConfig, device):
    """(model, tokenizer) for training: the configured dtype on `device`, no KV cache, optional checkpointing."""
    from transformers import AutoModelForCausalLM

    from ..models.ids import resolve_model
    from ..models.loading import load_tokenizer, pick_dtype

    m = cfg.model
    tok = load_tokenizer(m.model, revision=m.revision, trust_remote_code=m.trust_remote_code, padding_side="right")
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model(m.model),
        revision=m.revision,
        dtype=pick_dtype(m.dtype, str(device)),
        trust_remote_code=m.trust_remote_code,
    )
    if m.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    return model, tok


class LoRARecipe:
    """One training worker's loop (rank `rank` of `world`); see the module docstring for the life cycle."""

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        total_steps: int,
        report: Report,
        rank: int = 0,
        world: int = 1,
        device: Any = "cpu",
        node_id: str = "local",
        wrap_ddp: Callable | None = None,
        progress_dir: str | None = None,
        config_hash: str = "",
        on_step: Callable[[dict], None] | None = None,
    ) -> None:
        self.cfg, self.total_steps, self.report = cfg, total_steps, report
        self.on_step = on_step  # every step's metrics (step, loss, tokens/s), e.g. to a metrics system
        self.rank, self.world, self.device, self.node_id = rank, world, device, node_id
        self.wrap_ddp = wrap_ddp or (lambda model: model.to(device))  # Ray Train passes prepare_model
        self.progress_dir = progress_dir
        self.fsdp = cfg.scaling.strategy == "fsdp"
        self.state: dict = {
            "step": 0,
            "epoch": 0,
            "micro_in_epoch": 0,
            "history": [],
            "evals": [],
            "tokens": 0,
            "truncated": 0,
            "attempts": [],
            "config_hash": config_hash,
        }
        self._resume_dir: str | None = None
        self._progress: ProgressLog | None = None

    def setup(self) -> None:
        """Base model + LoRA (seeded), then load_checkpoint may run, then `_wrap` builds DDP/FSDP and the optimizer."""
        import torch

        model, self.tokenizer = load_model(self.cfg, self.device)
        torch.manual_seed(self.cfg.optim.seed)
        lc = self.cfg.lora
        self.model = apply_lora(
            model,
            r=lc.r,
            alpha=lc.alpha,
            dropout=lc.dropout,
            target_modules=lc.target_modules,
            modules_to_save=lc.modules_to_save,
        )

    def load_checkpoint(self, folder: str | None) -> None:
        """Resume from a checkpoint folder written by `save_checkpoint` (None: a fresh start)."""
        import torch

        if folder:
            self.state = json.loads((Path(folder) / STATE_FILE).read_text())
            saved = torch.load(Path(folder) / "trainable.pt", map_location="cpu")
            missing = {n for n, p in unwrap(self.model).named_parameters() if p.requires_grad} - set(saved)
            if missing:
                raise RuntimeError(f"checkpoint does not match the model/LoRA config: missing {sorted(missing)[:3]}")
            unwrap(self.model).load_state_dict(saved, strict=False)
            self._resume_dir = folder
        self._record_attempt()
        self._wrap()
        self._resume_dir = None  # the folder may be temporary (Ray's as_directory)

    def _record_attempt(self) -> None:
        import torch.distributed as dist

        nodes = [self.node_id] * self.world  # which node each rank ran on, per attempt (for operators)
        if self.world > 1:
            dist.all_gather_object(nodes, self.node_id)
        s = self.state
        s["attempts"].append({"start_step": s["step"], "world_size": self.world, "time": time.time(), "nodes": nodes})
        if self.rank == 0 and s["step"]:
            logging.getLogger("caslie").info(
                f"[train] resuming at step {s['step']} (epoch {s['epoch']}, micro-batch {s['micro_in_epoch']})"
            )

    def _wrap(self) -> None:
        import torch

        o = self.cfg.optim
        self.model = wrap_fsdp(self.model, self.device) if self.fsdp else self.wrap_ddp(self.model)
        self.model.train()
        self.opt = make_optimizer(self.model, lr=o.lr, weight_decay=o.weight_decay)
        self.sched = make_scheduler(
            self.opt, kind=o.schedule, warmup_steps=int(o.warmup_ratio * self.total_steps), total_steps=self.total_steps
        )
        if self._resume_dir:
            d = Path(self._resume_dir)
            osd = torch.load(d / "optimizer.pt", map_location="cpu", weights_only=False)
            self.opt.load_state_dict(fsdp_optim_to_load(self.model, self.opt, osd) if self.fsdp else osd)
            self.sched.load_state_dict(torch.load(d / "scheduler.pt", map_location="cpu", weights_only=False))
        if self.progress_dir:  # the step log of this worker-group start, on the run's storage (any fsspec URL)
            self._progress = ProgressLog(self.progress_dir, self.state["step"], rank=self.rank)

    def cleanup(self) -> None:
        """Drop the model and optimizer (a worker may run more than one recipe in its life)."""
        self.model = self.opt = self.sched = None

    def _all_sum(self, values: list[float]) -> list[float]:
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(t)
        return t.tolist()

    def evaluate(self, batches: Iterable[dict] | None) -> float | None:
        """Mean token loss over the eval batches, summed over all ranks (a collective)."""
        import torch

        if batches is None:
            return None
        self.model.eval()
        loss = toks = 0.0
        pad = self.tokenizer.pad_token_id
        with torch.no_grad():
            for i, batch in enumerate(batches):
                if self.cfg.eval.max_batches and i >= self.cfg.eval.max_batches:
                    break
                b = collate(batch["input_ids"], batch["labels"], pad, device=self.device)
                ls, nt = micro_batch_loss(self.model, b)
                loss += float(ls)
                toks += nt
        self.model.train()
        loss, toks = self._all_sum([loss, toks])
        return loss / toks if toks else None

    def save_checkpoint(self, metrics: dict, *, with_checkpoint: bool) -> None:
        """Report metrics; with a checkpoint, rank 0 writes adapter, optimizer, scheduler and state first."""
        import torch

        full = osd = None
        if with_checkpoint and self.fsdp:
            full, osd = fsdp_full_state(self.model, self.opt)  # collectives: every rank takes part
        if self._progress:
            self._progress.flush()  # object storage has no append: the step log goes up with each report
        if not (with_checkpoint and self.rank == 0):
            self.report(metrics, None)
            return
        with tempfile.TemporaryDirectory(prefix="caslie-ckpt-") as tmp:
            d = Path(tmp)
            inner = unwrap(self.model)
            if full is not None:
                names = {
                    n.replace("_fsdp_wrapped_module.", "") for n, p in self.model.named_parameters() if p.requires_grad
                }
                trainable = {k: v for k, v in full.items() if k in names}
                inner.save_pretrained(d / "adapter", state_dict=full)
            else:
                trainable = trainable_state(self.model)
                inner.save_pretrained(d / "adapter")
            self.tokenizer.save_pretrained(d / "adapter")
            torch.save(trainable, d / "trainable.pt")
            torch.save(osd if self.fsdp else self.opt.state_dict(), d / "optimizer.pt")
            torch.save(self.sched.state_dict(), d / "scheduler.pt")
            (d / STATE_FILE).write_text(json.dumps(self.state))
            self.report(metrics, tmp)

    def train(
        self, train_batches: Callable[[int], Iterable[dict]], eval_batches: Callable[[], Iterable[dict]] | None = None
    ) -> dict:
        """Train until `total_steps` or the configured epochs; returns the final state.

        `train_batches(epoch)` yields this rank's micro-batches (numpy dicts with input_ids, labels,
        truncated) in the epoch's order; `eval_batches()` this rank's evaluation batches."""
        import torch

        cfg, s = self.cfg, self.state
        accum, pad = cfg.optim.grad_accum, self.tokenizer.pad_token_id
        self._t_first, self._tokens_timed = None, 0.0
        done = s["step"] >= self.total_steps
        while not done and s["epoch"] < cfg.optim.epochs:
            skip = s["micro_in_epoch"]
            micro = pending = 0
            acc = [0.0, 0.0, 0.0, 0.0]  # loss, loss tokens, real tokens, truncated examples
            iterator = iter(train_batches(s["epoch"]))
            while True:
                batch = next(iterator, None)
                end_of_epoch = batch is None
                if not end_of_epoch:
                    micro += 1
                    if micro <= skip:
                        continue
                    b = collate(batch["input_ids"], batch["labels"], pad, device=self.device)
                    sync = pending + 1 == accum
                    quiet = self.world > 1 and not sync and hasattr(self.model, "no_sync")
                    with self.model.no_sync() if quiet else contextlib.nullcontext():
                        ls, nt = micro_batch_loss(self.model, b)
                        (ls / max(nt, 1) / accum).backward()
                    acc[0] += float(ls.detach())
                    acc[1] += nt
                    acc[2] += float(b["attention_mask"].sum())
                    if s["epoch"] == 0:
                        acc[3] += float(batch["truncated"].sum())
                    pending += 1
                if pending and (pending == accum or end_of_epoch):
                    if self.fsdp:  # the norm over all shards
                        self.model.clip_grad_norm_(cfg.optim.max_grad_norm)
                    else:
                        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.max_grad_norm)
                    self.opt.step()
                    self.sched.step()
                    self.opt.zero_grad(set_to_none=True)
                    pending = 0
                    s["step"] += 1
                    s["micro_in_epoch"] = micro
                    done = self._after_step(self._all_sum(acc), eval_batches)
                    acc = [0.0, 0.0, 0.0, 0.0]
                    if done:
                        break
                if end_of_epoch:
                    break
            if not done:
                s["epoch"] += 1
                s["micro_in_epoch"] = 0
        if not s.get("finished"):
            # Data ran out before total_steps (e.g. fewer rows than counted): finish with a checkpoint.
            s["finished"] = True
            self.save_checkpoint({"step": s["step"], "epoch": s["epoch"]}, with_checkpoint=True)
        return s

    def _after_step(self, sums: list[float], eval_batches) -> bool:
        """Log the step, evaluate and checkpoint when due; True once the last step is done."""
        cfg, s = self.cfg, self.state
        loss_sum, n_tok, n_real, n_trunc = sums
        now = time.time()
        if self._t_first is None:
            self._t_first = now  # throughput counts from the end of the first step (start-up excluded)
        else:
            self._tokens_timed += n_real
        s["tokens"] += int(n_real)
        s["truncated"] += int(n_trunc)
        entry = {
            "step": s["step"],
            "epoch": s["epoch"],
            "loss": loss_sum / max(n_tok, 1),
            "lr": self.sched.get_last_lr()[0],
            "time": now,
        }
        s["history"].append(entry)
        if self._progress:
            self._progress.add(entry)
        done = s["step"] >= self.total_steps
        metrics = {
            "step": s["step"],
            "epoch": s["epoch"],
            "train_loss": entry["loss"],
            "lr": entry["lr"],
            "tokens": s["tokens"],
            "tokens_per_s": self._tokens_timed / (now - self._t_first) if now > self._t_first else None,
        }
        if self.on_step is not None:
            self.on_step(dict(metrics, rank=self.rank))
        every = cfg.eval.every_steps
        want_eval = cfg.eval.enabled and (done or (every and s["step"] % every == 0))
        want_ckpt = done or s["step"] % cfg.checkpoint.every_steps == 0
        if want_eval:
            metrics["eval_loss"] = self.evaluate(eval_batches() if eval_batches else None)
            s["evals"].append({"step": s["step"], "eval_loss": metrics["eval_loss"]})
        if done:
            s["tokens_per_s"] = metrics["tokens_per_s"]
            s["finished"] = True
        if want_eval or want_ckpt:
            self.save_checkpoint(metrics, with_checkpoint=want_ckpt)
        return done
