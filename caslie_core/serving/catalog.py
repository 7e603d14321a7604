"""The model ids a client names, and where each one's weights are.

Ids follow Ray Serve LLM: the base model by its Hugging Face id (`mistralai/Mistral-7B-Instruct-v0.3`), each LoRA
adapter as `BASE:ADAPTER`. The short adapter names of earlier releases (and `base`) stay accepted as aliases, not
listed. Beyond the adapters in the config, an adapter store (a folder, local or `s3://`, one sub-folder per
PEFT adapter) serves any adapter put there: named `BASE:NAME`, it is loaded on first use by the Predictor's
model multiplexing (LRU-unloaded), with no redeploy. The store is listed again whenever a request names an
adapter not seen yet, else at most every `STORE_TTL_S`.
"""

from __future__ import annotations

import time

from ..config.serve import ADAPTER_NAME as NAME
from .api import BASE_MODEL_NAME as BASE  # the multiplexed id of the base model alone
from .api import model_not_found

STORE_TTL_S = 10.0
STORE_MIN_RELIST_S = 1.0


def store_adapters(store: str) -> list[str]:
    """Sub-folders of the store that hold a PEFT adapter (`adapter_config.json`), by name."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(store)
    root = root.rstrip("/")
    try:
        found = fs.glob(f"{root}/*/adapter_config.json")
    except FileNotFoundError:
        return []
    names = [p.rstrip("/").rsplit("/", 2)[-2] for p in found]
    return sorted(n for n in names if NAME.match(n))


class ServedModels:
    def __init__(self, spec: dict) -> None:
        self.base_id: str = spec["base_id"]
        self.ids: dict[str, str] = dict(spec["ids"])  # listed id -> multiplexed id (adapter name or BASE)
        self.aliases: dict[str, str] = dict(spec["aliases"])  # short name -> listed id
        self.store: str | None = spec.get("store")
        self.default = next(iter(self.ids))
        self._stored: list[str] = []
        self._listed_at = float("-inf")

    def _store_names(self, *, fresh: bool = False) -> list[str]:
        # A name not seen yet lists the store again, at most once a second (clients naming made-up adapters
        # must not turn every request into a listing of the bucket)
        age = time.monotonic() - self._listed_at
        if self.store and (age > STORE_TTL_S or (fresh and age > STORE_MIN_RELIST_S)):
            self._stored, self._listed_at = store_adapters(self.store), time.monotonic()
        return self._stored

    def _stored_ids(self, *, fresh: bool = False) -> dict[str, str]:
        taken = {*self.ids.values(), BASE}  # configured adapters win; `base` is the base model's own id
        return {f"{self.base_id}:{n}": n for n in self._store_names(fresh=fresh) if n not in taken}

    def resolve(self, name: str | None) -> tuple[str, str]:
        """(the model's listed id, its multiplexed id) for what a request names (None = the default model);
        404 `model_not_found` otherwise. May list the store (blocking I/O: call it off the event loop)."""
        name = self.default if name is None else self.aliases.get(name, name)
        if name in self.ids:
            return name, self.ids[name]
        if self.store and name.startswith(f"{self.base_id}:") and NAME.match(name[len(self.base_id) + 1 :]):
            for fresh in (False, True):
                if name in (stored := self._stored_ids(fresh=fresh)):
                    return name, stored[name]
        raise model_not_found(name, [*self.ids, *self._stored_ids()][:20])

    def cards(self) -> list[dict]:
        from .openai import model_card

        listed = [*self.ids, *self._stored_ids()]
        return [model_card(i, parent=None if i == self.base_id else self.base_id) for i in listed]

    def card(self, name: str) -> dict:
        listed, _ = self.resolve(name)
        return next(c for c in self.cards() if c["id"] == listed)
