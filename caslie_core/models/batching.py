"""Running a model over items in batches without letting one bad item fail its neighbours."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..errors import EngineError

T = TypeVar("T")
R = TypeVar("R")
log = logging.getLogger("caslie")


def error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


@dataclass
class Fallbacks:
    """A model's batches that raised and were redone item by item: never silent. The first is logged with its
    exception; `limit` of them in a row in which every item then succeeded alone means the model cannot batch
    at all (a processor or model defect, not bad data): logged once as running at batch size 1.

    `take()` hands the count since the last take to whoever exports it (a metric, the job's summary)."""

    model: str
    limit: int = 3
    count: int = 0
    single_only: bool = False
    _rescued_streak: int = 0
    _taken: int = 0

    def record(self, error: BaseException, size: int, failed_alone: int) -> None:
        self.count += 1
        if self.count == 1:
            log.warning(
                f"{self.model}: a batch of {size} raised and was redone item by item "
                f"({failed_alone} failed alone): {error_text(error)}"
            )
        self._rescued_streak = self._rescued_streak + 1 if failed_alone == 0 else 0
        if self._rescued_streak >= self.limit and not self.single_only:
            self.single_only = True
            log.warning(
                f"{self.model} is running at batch size 1: {self._rescued_streak} batches in a row raised while "
                f"every item alone succeeded (last: {error_text(error)}); that is how the inputs are batched for "
                f"this model, not the data"
            )

    def take(self) -> int:
        new, self._taken = self.count - self._taken, self.count
        return new


def run_batched(
    items: Sequence[T],
    batch_size: int,
    run: Callable[[list[T]], list[R]],
    failed: Callable[[BaseException], R],
    *,
    sort_key: Callable[[T], Any] | None = None,
    fallbacks: Fallbacks | None = None,
    is_error: Callable[[R], bool] | None = None,
) -> list[R]:
    """`run` over batches of `items`; results in the items' order.

    A batch that raises is retried item by item, and an item that still raises gets `failed(error)`; each such
    batch is recorded in `fallbacks` (with how many items failed alone: `is_error` of a result, or a raise).
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
            bad = 0
            for i in idx:
                try:
                    results[i] = run([items[i]])[0]
                    bad += bool(is_error and is_error(results[i]))
                except Exception as e:
                    results[i], bad = failed(e), bad + 1
            if fallbacks is not None:
                fallbacks.record(batch_error, len(idx), bad)
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

    def __call__(
        self,
        items: list,
        run: Callable[[list], list],
        failed: Callable[[BaseException], Any],
        errors,
        fallbacks: Fallbacks | None = None,
    ):
        """`fallbacks`: the model's own counts, where a call that raises as a whole is recorded too."""
        if not items:
            return []
        outs = run_batched(items, len(items), run, failed, fallbacks=fallbacks, is_error=lambda o: bool(errors([o])[0]))
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
