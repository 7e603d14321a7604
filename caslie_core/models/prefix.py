"""Prefix caching for the predictor: every prompt of a style begins with the same tokens (the template's opening,
preamble and instruction heading: 33 of the ~80 tokens of a short chat prompt with the alpaca template), so their
key/value cache is computed once per adapter and each generation's prefill runs over the request's own tokens only
(vLLM's automatic prefix caching, for the one prefix that every prompt shares).

A batch is laid out as `[prefix][padding][the row's own tokens]` rather than left-padded: position ids come from
the attention mask, so each row sees exactly what it sees left-padded. The answers are those of a full prefill up to
float rounding (the first step's logits differ by ~1e-6 on the test models); tests hold them equal."""

from __future__ import annotations

import copy


class PrefixCache:
    """The shared prefix's token ids and its key/value cache per adapter (`key`: the adapter's name, None for the
    base or merged model). `forget(key)` when the weights behind a key change (an adapter loaded or unloaded)."""

    def __init__(self, tokenizer, style: str) -> None:
        from ..prompts import prompt_head

        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        ids = bos + tokenizer(prompt_head(style), add_special_tokens=False)["input_ids"]
        # The head's last token may merge with the words after it; a row uses the cache only if it starts with these.
        self.ids: list[int] = ids[:-1]
        self.saved: dict = {}

    def forget(self, key) -> None:
        self.saved.pop(key, None)

    def fits(self, rows: list[list[int]]) -> bool:
        """Every row begins with the prefix and has tokens of its own after it."""
        k = len(self.ids)
        return k > 1 and all(len(r) > k and r[:k] == self.ids for r in rows)

    def layout(self, rows: list[list[int]], pad: int) -> tuple[list[list[int]], list[list[int]]]:
        """Ids and attention mask of `rows` (which `fits`), the padding between the prefix and each row's tokens."""
        k, longest = len(self.ids), max(len(r) for r in rows)
        ids = [self.ids + [pad] * (longest - len(r)) + r[k:] for r in rows]
        mask = [[1] * k + [0] * (longest - len(r)) + [1] * (len(r) - k) for r in rows]
        return ids, mask

    def cache(self, model, key, rows: int, device):
        """A fresh copy of the prefix's key/value cache for a batch of `rows` (generation writes into it), computed
        with `model` on first use for `key` (call it in inference mode); None when the model generates with another
        kind of cache than a DynamicCache (static or hybrid: left to a full prefill over the same layout)."""
        import torch
        from transformers import DynamicCache

        if key not in self.saved:
            past = None
            if getattr(model.generation_config, "cache_implementation", None) is None:
                past = model(input_ids=torch.tensor([self.ids], device=device), use_cache=True).cache
            self.saved[key] = past if type(past) is DynamicCache else None
        if self.saved[key] is None:
            return None
        past = copy.deepcopy(self.saved[key])
        if rows > 1:
            past.batch_repeat_interleave(rows)
        return past
