"""What every Ray job shares: connecting to a cluster, Arrow <-> row conversion, progress settings."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def init_ray(ray_cfg) -> bool:
    """Connect to `ray.address`, else RAY_ADDRESS, else start a local cluster. Returns True if we started it.

    Workers must import our packages: the repo goes on PYTHONPATH (inherited by local workers) and
    in the runtime env's working_dir is left to the submitter (see cluster/runtime_env.yaml).
    """
    import ray

    if ray.is_initialized():
        return False
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in [str(ROOT), os.environ.get("PYTHONPATH", "")] if p)
    address = ray_cfg.address or os.environ.get("RAY_ADDRESS")
    kwargs = {"logging_level": "WARNING", "log_to_driver": True}
    if address:
        ray.init(address=address, **kwargs)
        return False
    ray.init(
        num_cpus=ray_cfg.num_cpus, object_store_memory=ray_cfg.object_store_memory, include_dashboard=False, **kwargs
    )
    return True


def configure_data_context(progress_bars: bool | None) -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    show = progress_bars if progress_bars is not None else (sys.stderr.isatty() and not os.environ.get("CI"))
    ctx.enable_progress_bars = bool(show)
    ctx.print_on_execution_start = bool(show)
    ctx.enable_operator_progress_bars = bool(show)


def to_table(rows: list[dict], types: dict):
    """Rows -> Arrow table with fixed column types (stable schemas across blocks)."""
    import pyarrow as pa

    schema = pa.schema([(name, typ) for name, typ in types.items()])
    return pa.Table.from_pylist([{k: r.get(k) for k in types} for r in rows], schema=schema)


def job_main(name: str, model, run, doc: str | None, argv: list[str] | None) -> int:
    """`python -m ray_jobs.<name> --config FILE [--set k=v ...]`: load and validate the config, run the job."""
    import argparse

    from caslie_core.config import load_config

    parser = argparse.ArgumentParser(prog=f"python -m ray_jobs.{name}", description=(doc or "").split("\n\n")[0])
    parser.add_argument("--config", required=True, help=f"YAML config (see configs/{name}-*.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    run(load_config(model, args.config, args.overrides))
    return 0
