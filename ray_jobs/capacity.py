"""Before an enrichment (or evaluation) starts: one actor of every model pool must fit on the cluster, within the pool's
`start_timeout_s`; otherwise the job fails naming the resource, instead of waiting forever while the CPU
stages fill the object store for a pool that never starts.

A probe placement group of one actor's resources is what asks an autoscaling cluster to add a node (the
autoscaler sees its demand like an actor's); it is removed as soon as it is placed, and the pool's first
actor then takes that room. A cluster this job started itself cannot grow: a resource none of its nodes has
fails at once.
"""

from __future__ import annotations

import time

from caslie_core.errors import CaslieError

from .common import log


def pool_requests(cfg) -> list[tuple[str, dict, float]]:
    """(config key, resources of one actor, start_timeout_s) of each model pool the job will start."""
    return [(key, actor_resources(pool), float(pool.start_timeout_s)) for key, pool in cfg.model_pools_used()]


def actor_resources(pool) -> dict:
    """What one actor of a `PoolConfig` asks of the cluster (as `map_batches` is given it)."""
    return {"CPU": float(pool.num_cpus), **({"GPU": float(pool.num_gpus)} if pool.num_gpus else {})}


def _fmt(res: dict) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(res.items()) if not k.startswith("node:")) + "}"


def wait_for_pools(requests: list[tuple[str, dict, float]], *, can_grow: bool) -> dict[str, float]:
    """Wait until one actor of each pool could be placed; seconds waited per pool. Raises CaslieError naming
    the key and the resource when a pool cannot start (at once when the cluster cannot grow)."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    waited = {}
    for key, res, timeout in requests:
        total = ray.cluster_resources()
        short = {k: v for k, v in res.items() if total.get(k, 0.0) < v}
        fix = (
            f"set {key}.num_gpus: 0 to run it on CPUs"
            if "GPU" in short
            else f"lower {key}.num_cpus or add bigger nodes"
        )
        if short and not can_grow:
            raise CaslieError(
                f"{key} asks {_fmt(res)} per actor, but this cluster has {_fmt(total)} and cannot grow (a local "
                f"cluster started by this job): no node can ever offer {_fmt(short)}; {fix}"
            )
        if not short and ray.available_resources().get("CPU", 0.0) >= res["CPU"] and "GPU" not in res:
            waited[key] = 0.0  # already there (the usual CPU case): no probe
            continue
        t = time.monotonic()
        pg = placement_group([res])
        try:
            if not pg.wait(timeout_seconds=timeout):
                now = ray.cluster_resources()
                raise CaslieError(
                    f"{key} asks {_fmt(res)} per actor and the cluster ({_fmt(now)}) did not offer it within "
                    f"{key}.start_timeout_s={timeout:g}s; no node type of the cluster may provide "
                    f"{_fmt(short or res)}: {fix}, or raise {key}.start_timeout_s if nodes are still coming"
                )
        finally:
            remove_placement_group(pg)
        waited[key] = round(time.monotonic() - t, 1)
        if waited[key] >= 1:
            log.info(f"[capacity] {key}: the cluster offered {_fmt(res)} after {waited[key]:g}s")
    return waited
