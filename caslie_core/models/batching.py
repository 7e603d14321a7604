"""Running a model over items in batches without letting one bad item fail its neighbours."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..errors import EngineError

T = TypeVar("T")
R = TypeVar("R")


def error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def run_batched(
    items: Sequence[T],
    batch_size: int,
    run: Callable[[list[T]], list[R]],
    failed: Callable[[BaseException], R],
    *,
    sort_key: Callable[[T], Any] | None = None,
) -> list[R]:
    """`run` over batches of `items`; results in the items' order.

    A batch that raises is retried item by item, and an item that still raises gets `failed(error)`.
    `sort_key` groups similar items (e.g. prompt length: less padding per batch)."""
    order = sorted(range(len(items)), key=lambda i: sort_key(items[i])) if sort_key else list(range(len(items)))
    results: list[Any] = [None] * len(items)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        try:
            for i, r in zip(idx, run([items[i] for i in idx]), strict=True):
                results[i] = r
        except Exception as batch_error:  # isolate the bad item(s)
            if len(idx) == 1:
                results[idx[0]] = failed(batch_error)
                continue
            for i in idx:
                try:
                    results[i] = run([items[i]])[0]
                except Exception as e:
                    results[i] = failed(e)
    return results


def groups(keys) -> dict:
    """Positions by key, keys in first-seen order: `groups("aba") == {"a": [0, 2], "b": [1]}`."""
    out: dict = {}
    for i, k in enumerate(keys):
        out.setdefault(k, []).append(i)
    return out


class FailureStreak:
    """Batches in a row in which every item failed. Past `limit`, the model (or its device) is broken,
    not the data: a service replica then reports itself unhealthy."""

    def __init__(self, limit: int = 3) -> None:
        self.limit, self.count = limit, 0

    def track(self, errors: list) -> None:
        self.count = self.count + 1 if errors and all(errors) else 0

    @property
    def failing(self) -> bool:
        return self.count >= self.limit

    def reason(self) -> str:
        return f"{self.count} batches in a row failed on every item"


@dataclass
class ModelCalls:
    """Calls a model on a list of items: a batch that raises is retried item by item (an item that still
    raises gets its own error); past `streak.limit` batches in a row where every item failed, the model is
    broken: raise `EngineError` naming it."""

    what: str
    streak: FailureStreak = field(default_factory=FailureStreak)

    def __call__(self, items: list, run: Callable[[list], list], failed: Callable[[BaseException], Any], errors):
        if not items:
            return []
        outs = run_batched(items, len(items), run, failed)
        errs = errors(outs)
        self.streak.track(errs)
        if self.streak.failing:
            last = next(e for e in reversed(errs) if e)
            raise EngineError(
                f"{self.what} failed on every item of {self.streak.count} batches in a row (last error: {last}); "
                f"that is the model or its device, not the data: check its config (model, revision, dtype) "
                f"and the actor's log"
            )
        return outs
