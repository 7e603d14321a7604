"""`caslie train`: LoRA fine-tuning on Ray Train (TorchTrainer), enriched data in, a PEFT adapter out.

Driver: resolve and count the data (failed enrichment rows skipped and counted), check the config
against the model (target modules on a meta-device copy) and the data (no empty split) before any
worker starts, build Ray Data pipelines that filter and tokenize, run the TorchTrainer, then copy the
final adapter, tokenizer, summary and resolved config to `output.path`.

Workers: load the base model, add LoRA, resume from `ray.train.get_checkpoint()` (adapter weights,
optimizer, scheduler, step, epoch and position in the epoch), train data-parallel (DDP or FSDP),
report metrics and checkpoints through `ray.train.report`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

from caslie_core.config import config_hash, write_resolved
from caslie_core.errors import CaslieError, ConfigError
from caslie_core.jobconfigs import TrainConfig
from caslie_core.records import detect_format, normalise_split
from caslie_core.tasks import get_task
from caslie_core.training import TRAINABLE_STATUSES

from .common import configure_data_context, init_ray, job_main

ENRICHED_COLUMNS = [
    "id",
    "task",
    "split",
    "status",
    "instruction",
    "input",
    "options",
    "output",
    "original_input",
    "original_options",
]
STATE_FILE = "trainer_state.json"


# ------------------------------------------------------------------------------------------- data


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str):
    from transformers import AutoTokenizer

    from caslie_core.tiny_models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(path))


def prompt_style(cfg: TrainConfig) -> str:
    from caslie_core.prompts import default_style_for

    return default_style_for(cfg.model.model) if cfg.model.prompt_style == "auto" else cfg.model.prompt_style


def _split(value) -> str | None:
    try:
        return normalise_split(value)
    except ValueError:
        return None


def _task_names(tasks: list[str] | None) -> list[str] | None:
    return [get_task(t).name for t in tasks] if tasks else None


def keep_mask(statuses: list, splits: list, tasks: list, *, split: str, task_names: list[str] | None) -> list[bool]:
    """Rows that train: a trainable status, the wanted split, one of the wanted tasks."""
    out = []
    for status, s, t in zip(statuses, splits, tasks):
        ok = status in TRAINABLE_STATUSES and _split(s) == split
        if ok and task_names:
            try:
                ok = get_task(t).name in task_names
            except KeyError:
                ok = False
        out.append(ok)
    return out


def tokenize_batch(
    batch, *, tokenizer: str, style: str, use_enriched: bool, max_length: int, split: str, task_names: list[str] | None
):
    """Filter one Arrow batch of enriched (or record) rows to a split and tokenize it."""
    import pyarrow as pa

    from caslie_core.training import tokenize_example, training_example

    tok = _tokenizer(tokenizer)
    rows = batch.to_pylist()
    mask = keep_mask(
        [r.get("status", "ok") for r in rows],
        [r.get("split") for r in rows],
        [r.get("task") for r in rows],
        split=split,
        task_names=task_names,
    )
    ids, inputs, labels, n_tokens, truncated = [], [], [], [], []
    for row, keep in zip(rows, mask):
        if not keep:
            continue
        ex = training_example(row, style=style, use_enriched=use_enriched)
        x, y, cut = tokenize_example(tok, ex.prompt, ex.response, max_length)
        ids.append(ex.id)
        inputs.append(x)
        labels.append(y)
        n_tokens.append(len(x))
        truncated.append(cut)
    return pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "input_ids": pa.array(inputs, pa.list_(pa.int32())),
            "labels": pa.array(labels, pa.list_(pa.int32())),
            "n_tokens": pa.array(n_tokens, pa.int32()),
            "truncated": pa.array(truncated, pa.bool_()),
        }
    )


def _is_enriched_parquet(path: str) -> bool:
    import fsspec
    import pyarrow.parquet as pq

    with fsspec.open(path, "rb") as fh:
        names = set(pq.read_schema(fh).names)
    return {"status", "original_input"} <= names


def resolve_data(paths: str | list[str]) -> tuple[list[str], list[str], list[str]]:
    """(enriched parquet files, record files, problems) for `data.path`."""
    import fsspec

    from .enrich import list_parts

    enriched, records, problems = [], [], []
    for path in [paths] if isinstance(paths, str) else list(paths):
        fs, root = fsspec.core.url_to_fs(path)
        proto = path.split("://", 1)[0] + "://" if "://" in path else ""
        if not fs.exists(root):
            problems.append(f"data.path: {path} does not exist")
            continue
        if fs.isdir(root):
            parts = list_parts(path) if fs.exists(root.rstrip("/") + "/records") else []
            if parts:
                enriched.extend(parts)
                continue
            files = sorted(f for f in fs.find(root) if not Path(f).name.startswith((".", "_")))
            found = [proto + f if proto else f for f in files if _known_format(f)]
            if not found:
                problems.append(f"data.path: {path} holds no enrichment output (records/) and no JSONL/JSON/Parquet")
            for f in found:
                (enriched if f.endswith(".parquet") and _is_enriched_parquet(f) else records).append(f)
        elif path.endswith(".parquet") and _is_enriched_parquet(path):
            enriched.append(path)
        elif _known_format(path):
            records.append(path)
        else:
            problems.append(f"data.path: {path}: not JSONL, JSON or Parquet")
    return enriched, records, problems


def _known_format(path: str) -> bool:
    try:
        detect_format(path)
        return True
    except (ValueError, KeyError):
        return False


def count_rows(enriched: list[str], record_rows: list[dict]) -> dict:
    """Counts by split and status (read from three columns, cheap at catalog scale)."""
    import fsspec
    import pyarrow.parquet as pq

    counts: Counter = Counter()
    for path in enriched:
        with fsspec.open(path, "rb") as fh:
            t = pq.read_table(fh, columns=["status", "split", "task"])
        for status, split, task in zip(*(t.column(c).to_pylist() for c in ("status", "split", "task"))):
            counts[(_split(split) or str(split), status, task)] += 1
    for row in record_rows:
        counts[(_split(row["split"]) or str(row["split"]), "ok", row["task"])] += 1
    return counts


def split_counts(counts: Counter, split: str, task_names: list[str] | None) -> dict:
    def wanted(task):
        if not task_names:
            return True
        try:
            return get_task(task).name in task_names
        except KeyError:
            return False

    rows = {s: 0 for s in ("ok", "partial", "failed")}
    for (sp, status, task), n in counts.items():
        if sp == split and wanted(task):
            rows[status] = rows.get(status, 0) + n
    rows["usable"] = sum(rows.get(s, 0) for s in TRAINABLE_STATUSES)
    return rows


def precheck(cfg: TrainConfig) -> dict:
    """Everything that can be checked before a worker starts; raises ConfigError listing what to fix."""
    from caslie_core.records import load_records

    problems: list[str] = []
    enriched, record_files, data_problems = resolve_data(cfg.data.path)
    problems += data_problems
    record_rows, rejected = [], 0
    if record_files and not data_problems:
        loaded = load_records(record_files, mode="collect")
        record_rows = [r.to_row() for r in loaded.records]
        rejected = len(loaded.rejects)
    train_split = _split(cfg.data.train_split)
    eval_split = _split(cfg.data.eval_split)
    if train_split is None:
        problems.append(f"data.train_split: unknown split {cfg.data.train_split!r}")
    if eval_split is None:
        problems.append(f"data.eval_split: unknown split {cfg.data.eval_split!r}")
    try:
        task_names = _task_names(cfg.data.tasks)
    except KeyError as e:
        problems.append(f"data.tasks: {e.args[0]}")
        task_names = None
    problems += _model_problems(cfg)
    counts, train, evals = Counter(), {}, {}
    if not problems:
        counts = count_rows(enriched, record_rows)
        train = split_counts(counts, train_split, task_names)
        evals = split_counts(counts, eval_split, task_names)
        by_split = Counter()
        for (sp, _, _), n in counts.items():
            by_split[sp] += n
        if train["usable"] == 0:
            problems.append(
                f"data.train_split: no usable rows in split {train_split!r} (statuses ok/partial"
                f"{', tasks ' + str(task_names) if task_names else ''}); rows per split: "
                f"{dict(by_split) or 'none'}"
            )
        if cfg.eval.enabled and evals["usable"] == 0:
            problems.append(
                f"data.eval_split: no usable rows in split {eval_split!r}; rows per split: "
                f"{dict(by_split) or 'none'} (or set eval.enabled=false)"
            )
    if problems:
        raise ConfigError(problems)
    n_train = min(train["usable"], cfg.data.limit) if cfg.data.limit else train["usable"]
    if n_train < cfg.scaling.num_workers:
        raise ConfigError([f"scaling.num_workers: {cfg.scaling.num_workers} workers but only {n_train} training rows"])
    return {
        "enriched_files": enriched,
        "record_files": record_files,
        "record_rows": record_rows,
        "rejected_records": rejected,
        "train_split": train_split,
        "eval_split": eval_split,
        "task_names": task_names,
        "train": train,
        "eval": evals,
        "n_train": n_train,
    }


def _model_problems(cfg: TrainConfig) -> list[str]:
    """Load the model's config and build it on the meta device (no weights) to check LoRA targets."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from caslie_core.tiny_models import resolve_model
    from caslie_core.training import lora_target_problems, module_leaf_names

    try:
        conf = AutoConfig.from_pretrained(
            resolve_model(cfg.model.model), revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
        )
    except Exception as e:  # noqa: BLE001 - what the user must fix is in the message
        return [f"model.model: cannot load {cfg.model.model!r}: {type(e).__name__}: {str(e).splitlines()[0]}"]
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(conf, trust_remote_code=cfg.model.trust_remote_code)
    problems = lora_target_problems(skeleton, cfg.lora.target_modules)
    modules = {name.rsplit(".", 1)[-1] for name, _ in skeleton.named_modules() if name}
    missing = [m for m in cfg.lora.modules_to_save if m not in modules]
    if missing:
        problems.append(
            f"lora.modules_to_save: {missing} not in the model (linear modules: {sorted(module_leaf_names(skeleton))})"
        )
    return problems


def build_datasets(cfg: TrainConfig, pre: dict) -> dict:
    import ray.data

    kwargs = dict(
        tokenizer=cfg.model.model,
        style=prompt_style(cfg),
        use_enriched=cfg.data.use_enriched,
        max_length=cfg.data.max_length,
        task_names=pre["task_names"],
    )
    sources = []
    if pre["enriched_files"]:
        sources.append(ray.data.read_parquet(pre["enriched_files"], columns=ENRICHED_COLUMNS, partitioning=None))
    if pre["record_rows"]:
        sources.append(
            ray.data.from_items(
                [{**r, "status": "ok", "original_input": None, "original_options": None} for r in pre["record_rows"]]
            )
        )
    base = sources[0] if len(sources) == 1 else sources[0].union(*sources[1:])
    out = {}
    for name, split in (("train", pre["train_split"]), ("val", pre["eval_split"])):
        if name == "val" and not cfg.eval.enabled:
            continue
        ds = base.map_batches(
            tokenize_batch, batch_format="pyarrow", batch_size=256, num_cpus=0.25, fn_kwargs={**kwargs, "split": split}
        )
        if name == "train" and cfg.data.limit:
            ds = ds.limit(cfg.data.limit)
        out[name] = ds.materialize() if cfg.data.materialize else ds
    return out


# ---------------------------------------------------------------------------------------- workers


def _load_model(cfg: TrainConfig, device):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from caslie_core.modeling import pick_dtype
    from caslie_core.tiny_models import resolve_model

    path = resolve_model(cfg.model.model)
    tok = AutoTokenizer.from_pretrained(
        path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
    )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    dtype = pick_dtype(cfg.model.dtype, str(device))
    model = AutoModelForCausalLM.from_pretrained(
        path, revision=cfg.model.revision, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code
    )
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    torch.manual_seed(cfg.optim.seed)
    return model, tok


def _unwrap(model):
    return getattr(model, "module", model)


def _trainable_state(model) -> dict:
    return {n: p.detach().cpu().clone() for n, p in _unwrap(model).named_parameters() if p.requires_grad}


def train_loop_per_worker(c: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from caslie_core.training import apply_lora, collate, make_optimizer, make_scheduler, micro_batch_loss

    cfg = TrainConfig.model_validate(c["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL object collectives (the node-id gather below) use the current device
    model, tok = _load_model(cfg, device)
    model = apply_lora(
        model,
        r=cfg.lora.r,
        alpha=cfg.lora.alpha,
        dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        modules_to_save=cfg.lora.modules_to_save,
    )
    state = {
        "step": 0,
        "epoch": 0,
        "micro_in_epoch": 0,
        "history": [],
        "evals": [],
        "tokens": 0,
        "truncated": 0,
        "attempts": [],
        "config_hash": c["config_hash"],
    }
    ckpt = ray.train.get_checkpoint()
    ckpt_dir = None
    if ckpt:
        ckpt_dir = tempfile.mkdtemp(prefix="caslie-resume-")
        ckpt.to_directory(ckpt_dir)
        state = json.loads((Path(ckpt_dir) / STATE_FILE).read_text())
        saved = torch.load(Path(ckpt_dir) / "trainable.pt", map_location="cpu")
        missing = {n for n, p in _unwrap(model).named_parameters() if p.requires_grad} - set(saved)
        if missing:
            raise RuntimeError(f"checkpoint does not match the model/LoRA config: missing {sorted(missing)[:3]}")
        _unwrap(model).load_state_dict(saved, strict=False)
    node = ray.get_runtime_context().get_node_id()  # which node each rank ran on, per attempt (for operators)
    nodes = [node] * world
    if world > 1:
        dist.all_gather_object(nodes, node)
    state["attempts"].append({"start_step": state["step"], "world_size": world, "time": time.time(), "nodes": nodes})
    if rank == 0 and state["step"]:
        print(
            f"[train] resuming at step {state['step']} (epoch {state['epoch']}, micro-batch {state['micro_in_epoch']})"
        )

    fsdp = cfg.scaling.strategy == "fsdp"
    model = _wrap_fsdp(model, device) if fsdp else ray.train.torch.prepare_model(model)
    model.train()
    total_steps = c["total_steps"]
    opt = make_optimizer(model, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    sched = make_scheduler(
        opt, kind=cfg.optim.schedule, warmup_steps=int(cfg.optim.warmup_ratio * total_steps), total_steps=total_steps
    )
    if ckpt_dir:
        osd = torch.load(Path(ckpt_dir) / "optimizer.pt", map_location="cpu", weights_only=False)
        opt.load_state_dict(_fsdp_optim_to_load(model, opt, osd) if fsdp else osd)
        sched.load_state_dict(torch.load(Path(ckpt_dir) / "scheduler.pt", map_location="cpu", weights_only=False))

    train_shard = ray.train.get_dataset_shard("train")
    eval_shard = ray.train.get_dataset_shard("val") if cfg.eval.enabled else None
    accum, bs = cfg.optim.grad_accum, cfg.optim.batch_size
    pad = tok.pad_token_id
    # One file of step lines per worker-group start (rank 0 writes it): the audit trail of which
    # optimizer steps ran in which attempt.
    progress = (
        Path(c["progress_dir"]) / f"steps-{int(time.time() * 1000)}-from{state['step']}.jsonl"
        if c["progress_dir"]
        else None
    )
    if progress:
        progress.parent.mkdir(parents=True, exist_ok=True)
        # Which process is which rank in this attempt (for operators, and the restart test).
        (progress.parent / f"worker-rank{rank}.pid").write_text(str(os.getpid()))

    def all_sum(values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=device)
        if world > 1:
            dist.all_reduce(t)
        return t.tolist()

    def evaluate() -> float | None:
        if eval_shard is None:
            return None
        model.eval()
        loss = toks = 0.0
        with torch.no_grad():
            for i, batch in enumerate(eval_shard.iter_batches(batch_size=bs, batch_format="numpy")):
                if cfg.eval.max_batches and i >= cfg.eval.max_batches:
                    break
                ls, nt = micro_batch_loss(model, collate(batch["input_ids"], batch["labels"], pad, device=device))
                loss += float(ls)
                toks += nt
        model.train()
        loss, toks = all_sum([loss, toks])
        return loss / toks if toks else None

    def save_and_report(metrics: dict, with_checkpoint: bool) -> None:
        from ray.train import Checkpoint

        full = osd = None
        if with_checkpoint and fsdp:
            full, osd = _fsdp_full_state(model, opt)  # collectives: every rank takes part
        if not (with_checkpoint and rank == 0):
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory(prefix="caslie-ckpt-") as tmp:
            d = Path(tmp)
            inner = _unwrap(model)
            if full is not None:
                names = {n.replace("_fsdp_wrapped_module.", "") for n, p in model.named_parameters() if p.requires_grad}
                trainable = {k: v for k, v in full.items() if k in names}
                inner.save_pretrained(d / "adapter", state_dict=full)
            else:
                trainable = _trainable_state(model)
                inner.save_pretrained(d / "adapter")
            tok.save_pretrained(d / "adapter")
            torch.save(trainable, d / "trainable.pt")
            torch.save(osd if fsdp else opt.state_dict(), d / "optimizer.pt")
            torch.save(sched.state_dict(), d / "scheduler.pt")
            (d / STATE_FILE).write_text(json.dumps(state))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))

    t_first = None
    tokens_timed = 0.0
    done = state["step"] >= total_steps
    while not done and state["epoch"] < cfg.optim.epochs:
        skip = state["micro_in_epoch"]
        micro = pending = 0
        loss_acc = tok_acc = real_tok = trunc = 0.0
        batches = train_shard.iter_batches(
            batch_size=bs,
            batch_format="numpy",
            local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
            local_shuffle_seed=(cfg.optim.seed + state["epoch"]) if cfg.data.shuffle_buffer else None,
        )
        iterator = iter(batches)
        while True:
            batch = next(iterator, None)
            end_of_epoch = batch is None
            if not end_of_epoch:
                micro += 1
                if micro <= skip:
                    continue
                b = collate(batch["input_ids"], batch["labels"], pad, device=device)
                sync = pending + 1 == accum
                ctx_mgr = (
                    model.no_sync()
                    if (world > 1 and not sync and hasattr(model, "no_sync"))
                    else contextlib.nullcontext()
                )
                with ctx_mgr:
                    ls, nt = micro_batch_loss(model, b)
                    (ls / max(nt, 1) / accum).backward()
                loss_acc += float(ls.detach())
                tok_acc += nt
                real_tok += float(b["attention_mask"].sum())
                if state["epoch"] == 0:
                    trunc += float(batch["truncated"].sum())
                pending += 1
            if pending and (pending == accum or end_of_epoch):
                if fsdp:  # the norm over all shards
                    model.clip_grad_norm_(cfg.optim.max_grad_norm)
                else:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                pending = 0
                state["step"] += 1
                state["micro_in_epoch"] = micro
                loss_sum, n_tok, n_real, n_trunc = all_sum([loss_acc, tok_acc, real_tok, trunc])
                loss_acc = tok_acc = real_tok = trunc = 0.0
                now = time.time()
                if t_first is None:
                    t_first = now  # throughput counts from the end of the first step (start-up excluded)
                else:
                    tokens_timed += n_real
                state["tokens"] += int(n_real)
                state["truncated"] += int(n_trunc)
                entry = {
                    "step": state["step"],
                    "epoch": state["epoch"],
                    "loss": loss_sum / max(n_tok, 1),
                    "lr": sched.get_last_lr()[0],
                    "time": now,
                }
                state["history"].append(entry)
                if progress and rank == 0:
                    with open(progress, "a") as fh:
                        fh.write(json.dumps(entry) + "\n")
                done = state["step"] >= total_steps
                metrics = {
                    "step": state["step"],
                    "epoch": state["epoch"],
                    "train_loss": entry["loss"],
                    "lr": entry["lr"],
                    "tokens": state["tokens"],
                    "tokens_per_s": tokens_timed / (now - t_first) if now > t_first else None,
                }
                want_eval = cfg.eval.enabled and (
                    done or (cfg.eval.every_steps and state["step"] % cfg.eval.every_steps == 0)
                )
                want_ckpt = done or state["step"] % cfg.checkpoint.every_steps == 0
                if want_eval:
                    metrics["eval_loss"] = evaluate()
                    state["evals"].append({"step": state["step"], "eval_loss": metrics["eval_loss"]})
                if done:
                    state["tokens_per_s"] = metrics["tokens_per_s"]
                    state["finished"] = True
                if want_eval or want_ckpt:
                    save_and_report(metrics, with_checkpoint=want_ckpt)
                if done:
                    break
            if end_of_epoch:
                break
        if not done:
            state["epoch"] += 1
            state["micro_in_epoch"] = 0
    if not state.get("finished"):
        # Data ran out before total_steps (e.g. fewer rows than counted): finish with a checkpoint.
        state["finished"] = True
        save_and_report({"step": state["step"], "epoch": state["epoch"]}, with_checkpoint=True)


def _wrap_fsdp(model, device):
    """FSDP with one unit per decoder layer; `use_orig_params` because LoRA mixes frozen and trained
    parameters in a unit. Works on GPU (NCCL) and on CPU (gloo)."""
    import torch
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    layer_names = set(getattr(_base_model(model), "_no_split_modules", None) or [])
    layers = {type(m) for m in model.modules() if type(m).__name__ in layer_names}
    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=layers) if layers else None
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    if dev.type == "cuda":
        model.to(dev)
    return FSDP(
        model,
        auto_wrap_policy=policy,
        use_orig_params=True,
        device_id=dev if dev.type == "cuda" else torch.device("cpu"),
        sync_module_states=False,
    )


def _base_model(model):
    get = getattr(model, "get_base_model", None)
    return get() if get else model


def _fsdp_full_state(model, opt) -> tuple[dict, dict]:
    """Full model and optimizer state, gathered on rank 0 (a collective)."""
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    offload = next(model.parameters()).is_cuda  # offloading CPU tensors to the CPU crashes FSDP
    with FSDP.state_dict_type(
        model,
        StateDictType.FULL_STATE_DICT,
        FullStateDictConfig(offload_to_cpu=offload, rank0_only=True),
        FullOptimStateDictConfig(offload_to_cpu=offload, rank0_only=True),
    ):
        return model.state_dict(), FSDP.optim_state_dict(model, opt)


def _fsdp_optim_to_load(model, opt, osd: dict) -> dict:
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    offload = next(model.parameters()).is_cuda
    with FSDP.state_dict_type(
        model,
        StateDictType.FULL_STATE_DICT,
        FullStateDictConfig(offload_to_cpu=offload, rank0_only=False),
        FullOptimStateDictConfig(offload_to_cpu=offload, rank0_only=False),
    ):
        return FSDP.optim_state_dict_to_load(model, opt, osd)


# ----------------------------------------------------------------------------------------- driver


def run_name(cfg: TrainConfig) -> str:
    """Default run name: same data/model/LoRA/optimizer settings -> same name -> resume."""
    if cfg.run.name:
        return cfg.run.name
    key = {k: v for k, v in cfg.model_dump(mode="json").items() if k in ("model", "data", "lora", "optim")}
    import hashlib

    return "caslie-train-" + hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]


def _abs_storage(path: str) -> str:
    return path if "://" in path else str(Path(path).expanduser().resolve())


def run(cfg: TrainConfig) -> dict:
    """Train; return the summary (also written to `output.path/summary.json`)."""
    import fsspec
    import ray.train
    from ray.train.torch import TorchTrainer

    from caslie_core.training import steps_per_epoch

    pre = precheck(cfg)  # before any worker starts
    started = init_ray(cfg.ray)
    t0 = time.time()
    try:
        configure_data_context(cfg.ray.progress_bars)
        name = run_name(cfg)
        storage = _abs_storage(cfg.run.storage_path)
        datasets = build_datasets(cfg, pre)
        per_epoch = steps_per_epoch(
            pre["n_train"],
            num_workers=cfg.scaling.num_workers,
            batch_size=cfg.optim.batch_size,
            grad_accum=cfg.optim.grad_accum,
        )
        total = per_epoch * cfg.optim.epochs
        if cfg.optim.max_steps:
            total = min(total, cfg.optim.max_steps)
        progress_dir = str(Path(storage) / name / "progress") if "://" not in storage else None
        chash = config_hash(cfg)
        resources = {"CPU": cfg.scaling.cpus_per_worker, **cfg.scaling.resources_per_worker}
        if cfg.scaling.use_gpu:
            resources["GPU"] = 1
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "config": cfg.model_dump(mode="json"),
                "total_steps": total,
                "progress_dir": progress_dir,
                "config_hash": chash,
            },
            scaling_config=ray.train.ScalingConfig(
                num_workers=cfg.scaling.num_workers,
                use_gpu=cfg.scaling.use_gpu,
                resources_per_worker=resources,
                placement_strategy=cfg.scaling.placement_strategy,
            ),
            run_config=ray.train.RunConfig(
                name=name,
                storage_path=storage,
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
                failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            ),
            datasets=datasets,
        )
        existing = _existing_checkpoints(f"{storage}/{name}")
        if existing:
            print(f"[train] run {name} has {existing} checkpoint(s) under {storage}: resuming from the latest")
        print(
            f"[train] run {name}: {pre['n_train']} training rows on {cfg.scaling.num_workers} worker(s), "
            f"{total} steps; checkpoints under {storage}/{name}"
        )
        result = trainer.fit()
        if result.error:
            raise CaslieError(f"training failed: {result.error}")
        if result.checkpoint is None:
            raise CaslieError("training finished without a checkpoint")
        summary = finish(
            cfg,
            result.checkpoint,
            pre=pre,
            name=name,
            storage=storage,
            total=total,
            per_epoch=per_epoch,
            wall=time.time() - t0,
            chash=chash,
        )
        summary["resumed_existing_run"] = bool(existing)
        with fsspec.open(cfg.output.path.rstrip("/") + "/summary.json", "wt") as fh:
            json.dump(summary, fh, indent=2)
        curve = summary["loss_curve"]
        ev = "" if summary["eval_loss"] is None else f", eval loss {summary['eval_loss']:.3f}"
        print(
            f"[train] {summary['steps']} steps, train loss {curve['first']:.3f} -> {curve['last']:.3f}{ev}, "
            f"{summary['tokens_per_s'] or 0:.0f} tokens/s; adapter {summary['adapter']}"
        )
        return summary
    finally:
        if started:
            ray.shutdown()


def _existing_checkpoints(run_dir: str) -> int:
    import fsspec

    fs, root = fsspec.core.url_to_fs(run_dir)
    try:
        return sum(1 for p in fs.ls(root, detail=False) if p.rstrip("/").rsplit("/", 1)[-1].startswith("checkpoint_"))
    except FileNotFoundError:
        return 0


def finish(
    cfg: TrainConfig,
    checkpoint,
    *,
    pre: dict,
    name: str,
    storage: str,
    total: int,
    per_epoch: int,
    wall: float,
    chash: str,
) -> dict:
    """Copy the final adapter (+ tokenizer) to output.path, optionally merge, and build the summary."""
    import fsspec

    out = cfg.output.path.rstrip("/")
    fs, root = fsspec.core.url_to_fs(out)
    fs.makedirs(root, exist_ok=True)
    write_resolved(cfg, out)
    with tempfile.TemporaryDirectory(prefix="caslie-final-") as tmp:
        checkpoint.to_directory(tmp)
        state = json.loads((Path(tmp) / STATE_FILE).read_text())
        adapter_local = Path(tmp) / "adapter"
        fs.put(str(adapter_local), root.rstrip("/") + "/adapter", recursive=True)
        merged = None
        if cfg.output.merge:
            merged = out + "/merged"
            _merge(cfg, str(adapter_local), Path(tmp) / "merged")
            fs.put(str(Path(tmp) / "merged"), root.rstrip("/") + "/merged", recursive=True)
    history = state["history"]
    losses = [h["loss"] for h in history]
    window = max(1, len(losses) // 10)
    evals = state.get("evals", [])
    return {
        "job": "train",
        "run_name": name,
        "storage": f"{storage}/{name}",
        "checkpoint": checkpoint.path,
        "adapter": out + "/adapter",
        "merged": merged,
        "model": cfg.model.model,
        "prompt_style": prompt_style(cfg),
        "steps": state["step"],
        "planned_steps": total,
        "steps_per_epoch": per_epoch,
        "epoch": state["epoch"],
        "workers": cfg.scaling.num_workers,
        "effective_batch": cfg.optim.batch_size * cfg.optim.grad_accum * cfg.scaling.num_workers,
        "data": {
            "train": pre["train"],
            "eval": pre["eval"],
            "train_rows_used": pre["n_train"],
            "skipped_failed": pre["train"].get("failed", 0) + pre["eval"].get("failed", 0),
            "rejected_records": pre["rejected_records"],
            "truncated_train_examples": state["truncated"],
            "max_length": cfg.data.max_length,
        },
        "tokens": state["tokens"],
        "tokens_per_s": state.get("tokens_per_s"),
        "loss_curve": {
            "first": sum(losses[:window]) / window if losses else None,
            "last": sum(losses[-window:]) / window if losses else None,
            "steps": [h["step"] for h in history],
            "loss": [round(x, 5) for x in losses],
        },
        "eval_loss": evals[-1]["eval_loss"] if evals else None,
        "eval_curve": evals,
        "attempts": state["attempts"],
        "restarts": len(state["attempts"]) - 1,
        "wall_seconds": round(wall, 2),
        "config_hash": chash,
    }


def _merge(cfg: TrainConfig, adapter: str, out: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from caslie_core.tiny_models import resolve_model

    path = resolve_model(cfg.model.model)
    base = AutoModelForCausalLM.from_pretrained(
        path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
    )
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    merged.save_pretrained(out)
    AutoTokenizer.from_pretrained(adapter).save_pretrained(out)


def main(argv: list[str] | None = None) -> int:
    return job_main("train", TrainConfig, run, __doc__, argv)


if __name__ == "__main__":
    import sys

    from ray_jobs.cli import run_job_module

    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    sys.exit(run_job_module("train"))
