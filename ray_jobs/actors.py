"""Helper actors the jobs share: a named actor on the driver's node, and calls to it that degrade instead of
failing when it (or its node) is gone. Ray glue only; what the actors hold is in `caslie_core`."""

from __future__ import annotations

import os

from .common import log


def actor_id() -> str:
    """This actor's id (stable across its restarts), or the process id outside an actor."""
    import ray

    return ray.get_runtime_context().get_actor_id() or f"pid-{os.getpid()}"


def unreachable_errors() -> tuple[type[Exception], ...]:
    """What a call to an actor raises when the actor (or its node) is gone or not answering."""
    import ray

    return (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError)


def driver_actor(cls, name: str, namespace: str, *args):
    """A named helper actor pinned (softly) to the driver's node, restarted if it dies; no CPU reserved."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    options = dict(name=name, namespace=namespace, scheduling_strategy=here, max_restarts=-1, max_task_retries=-1)
    return ray.remote(num_cpus=0)(cls).options(**options).remote(*args)


def best_effort_get(ref, *, fallback, timeout_s: float = 60.0):
    """`ray.get` of an actor call; when the actor is unreachable, `fallback` (None: the error's name)."""
    import ray

    try:
        return ray.get(ref, timeout=timeout_s)
    except unreachable_errors() as e:
        return {"unavailable": type(e).__name__} if fallback is None else fallback


class BestEffortActor:
    """Calls a named actor, returning `fallback` (and saying so once) when it cannot be reached in time."""

    TIMEOUT_S = 60.0

    def __init__(self, name: str, namespace: str) -> None:
        import ray

        self.actor, self.name, self.unavailable = ray.get_actor(name, namespace=namespace), name, 0

    def call(self, method: str, *args, fallback):
        import ray

        try:
            return ray.get(getattr(self.actor, method).remote(*args), timeout=self.TIMEOUT_S)
        except unreachable_errors() as e:
            self.unavailable += 1
            if self.unavailable == 1:
                log.warning(f"[ray] actor {self.name} unavailable ({type(e).__name__}); going on without it")
            return fallback


class CaptionCacheClient(BestEffortActor):
    """Client of the run-wide caption cache actor (the `CaptionCache` protocol), best effort: when the actor
    cannot be reached, claims come back "mine" (caption it here) and puts/releases are dropped, so a lost
    cache costs duplicate captions, never records."""

    def claim(self, keys, owner):
        return self.call("claim", keys, owner, fallback={k: ("mine", None) for k in keys})

    def put(self, items, owner):
        self.call("put", items, owner, fallback=None)

    def release(self, keys, owner):
        self.call("release", keys, owner, fallback=None)
