"""What every Ray job shares: connecting to a cluster, the Ray Data context, Arrow rows, one config loader,
one command-line parser and one error guard for every job, and the job log.

Imports form a star: `cli`/`demo` -> the job shims -> this module -> `caslie_core`. Nothing here imports
a job module statically (`job_entry` loads one by name at run time), so no cycle can form.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JOBS = ("enrich", "train", "evaluate", "serve")


class _Stdout(logging.StreamHandler):
    """Writes to whatever `sys.stdout` is at the time (pytest's capture, a redirect)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value) -> None:
        pass


# The jobs' own progress lines ("[enrich] 140 records: ..."): INFO on stdout.
log = logging.getLogger("caslie")

from .connect import (  # noqa: E402,F401
    Interrupted,
    init_ray,
    running_local_cluster,
    shutdown,
    token_client_mode,
    verbose_mode,
)


def _ray_json_logging() -> bool:
    """A Ray worker of a job started with `ray.log_format=json`: Ray's LoggingConfig gave the root logger a
    JSON handler before our code was imported; our lines then go through it."""
    return any(type(h.formatter).__name__ == "JSONFormatter" for h in logging.getLogger().handlers)


if _ray_json_logging():
    log.setLevel(logging.INFO)
elif not log.handlers:
    _handler = _Stdout()
    _handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(_handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def quiet(verbose: bool) -> None:
    """Send Ray's workers' output and the libraries' chatter to the Ray session's log files, not the
    terminal; Ray's own warnings (a pool waiting for resources, a restarted worker group) still show."""
    os.environ["CASLIE_VERBOSE"] = "1" if verbose else "0"
    if verbose:
        return
    _quiet_loggers()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    import warnings

    # Only the libraries' own notices: our deprecations (a FutureWarning such as data.path's) stay visible.
    for category in (FutureWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(transformers|torch|ray|peft|accelerate)\b")


def _quiet_loggers() -> None:
    """Ray's warnings (a restarted worker group, resources that never come) stay; its INFO lines and the
    libraries' chatter go. Called again once Ray is up: Ray Data and Serve set their levels on import."""
    for name in ("ray", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in ("ray.data", "ray.serve", "transformers", "peft", "filelock"):
        logging.getLogger(name).setLevel(logging.ERROR)


def requiet() -> None:
    """Apply quiet mode again after a library (Ray Data, Serve) set its own log levels."""
    if not verbose_mode():
        _quiet_loggers()


def configure_data_context(progress_bars: bool | None, stall_s: float = 0) -> None:
    """Ray Data's progress: bars on a terminal, a log line every few seconds elsewhere (Ray Data picks), on
    unless `ray.progress_bars: false` (or RAY_DATA_DISABLE_PROGRESS_BARS=1 in the environment). `stall_s`: say
    where rows wait when the plane stalls that long (`stall.stall_callback`; 0: not watched)."""
    import ray.data

    from .stall import stall_callback

    requiet()
    ctx = ray.data.DataContext.get_current()
    callbacks = [c for c in ctx.custom_execution_callback_classes if not getattr(c, "caslie", False)]
    ctx.custom_execution_callback_classes = callbacks + ([stall_callback(stall_s)] if stall_s else [])
    if progress_bars is not None:
        ctx.enable_progress_bars = progress_bars
        ctx.enable_operator_progress_bars = progress_bars
    ctx.print_on_execution_start = ctx.enable_progress_bars and verbose_mode()


def read_inputs(enriched_files: list[str], record_rows: list[dict], columns):
    """One dataset over enrichment output parts (only `columns`) and raw record rows (train, evaluate)."""
    import ray.data

    sources = []
    if enriched_files:
        sources.append(ray.data.read_parquet(enriched_files, columns=list(columns), partitioning=None))
    if record_rows:
        sources.append(ray.data.from_items(record_rows))
    return sources[0] if len(sources) == 1 else sources[0].union(*sources[1:])


def to_table(rows: list[dict], types: dict):
    """Rows -> Arrow table with fixed column types (stable schemas across blocks)."""
    import pyarrow as pa

    schema = pa.schema([(name, typ) for name, typ in types.items()])
    return pa.Table.from_pylist([{k: r.get(k) for k in types} for r in rows], schema=schema)


def load_job_config(job: str, path: str | Path | None, overrides: list[str] | None = None):
    """The one config loader of every entry path (CLI, `python -m`, demo, submit): YAML + `--set`, validated."""
    from caslie_core.config import JOB_CONFIGS, load_config
    from caslie_core.config.paths import absolute_local_paths

    cfg = load_config(JOB_CONFIGS[job], path, overrides)
    token_client_mode(cfg.ray.address)
    changed = absolute_local_paths(cfg)  # workers do not share the driver's working directory
    if changed:
        log.info("[config] local paths made absolute: " + ", ".join(f"{k}={new}" for k, (_, new) in changed.items()))
    return cfg


def add_job_arguments(parser: argparse.ArgumentParser, *, positional: bool) -> argparse.ArgumentParser:
    """CONFIG and `--set KEY=VALUE` (repeatable); `positional` for `caslie JOB CONFIG`, else `--config`."""
    if positional:
        parser.add_argument("config", help="YAML config file (see configs/)")
    else:
        parser.add_argument("--config", required=True, help="YAML config file (see configs/)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value by dotted key, e.g. --set output.path=/tmp/out (repeatable)",
    )
    if positional:  # `caslie JOB`: quiet by default; `python -m ray_jobs.JOB` (submitted jobs) always verbose
        parser.add_argument("--verbose", action="store_true", help="show Ray's own logs on the terminal")
    return parser


def run_guarded(command: str, fn) -> int:
    """Run a command; problems the user can fix (the project's own errors, `CaslieError`: a bad config, an unknown
    name, a file that does not fit) print one clear line (exit 2). Anything else is a bug and keeps its traceback."""
    from caslie_core.errors import CaslieError

    try:
        return fn()
    except CaslieError as e:
        print(f"caslie {command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # a job that has nothing more to say (enrich says what it wrote)
        print(f"caslie {command}: interrupted ({e.args[0] if e.args else 'SIGINT'})", file=sys.stderr)
        return 130
    except OSError as e:  # a disk full, a permission: the job's own files, before or after its pipeline
        print(f"caslie {command}: error: {e}", file=sys.stderr)
        return 1


def job_main(job: str, run, doc: str | None, argv: list[str] | None) -> int:
    """`python -m ray_jobs.<job> --config FILE [--set k=v ...]`: load and validate the config, run the job.

    The entrypoint of submitted jobs: Ray's logs stay on (they are what `ray job logs` shows)."""
    parser = argparse.ArgumentParser(prog=f"python -m ray_jobs.{job}", description=(doc or "").split("\n\n")[0])
    args = add_job_arguments(parser, positional=False).parse_args(argv)
    run(load_job_config(job, args.config, args.overrides))
    return 0


def job_entry(job: str) -> int:
    """`python -m ray_jobs.<job>`: run the job from its importable module, not from `__main__`, under the guard.

    Run as `__main__`, the module's functions would be pickled for Ray's workers as `__main__.<name>`, which
    the workers cannot import (the same file is `ray_jobs.<job>` there).
    """
    import importlib

    module = importlib.import_module(f"ray_jobs.{job}")
    return run_guarded(job, lambda: module.main(sys.argv[1:]))
