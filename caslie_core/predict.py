"""Answering instruction prompts with a base model and an optional LoRA adapter (batched greedy).

Used by the evaluation job, the serving deployment and the training job's learnability checks.
As the research code: greedy decoding, up to 100 new tokens, the answer read after the response marker.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class Answer:
    text: str | None
    error: str | None = None
    n_prompt_tokens: int = 0
    n_new_tokens: int = 0


def adapter_base_model(adapter: str) -> str | None:
    """The base model an adapter folder was trained on (its adapter_config.json)."""
    import json

    cfg = Path(adapter) / "adapter_config.json"
    if not cfg.exists():
        return None
    return json.loads(cfg.read_text()).get("base_model_name_or_path")


class Predictor:
    """Batched left-padded greedy generation; `adapter` is a PEFT folder (or None for the base model)."""

    def __init__(self, model: str, *, adapter: str | None = None, revision: str | None = None,
                 dtype: str = "auto", device: str = "auto", max_new_tokens: int = 100, batch_size: int = 16,
                 max_prompt_tokens: int = 2048, merge: bool = True, trust_remote_code: bool = False) -> None:
        import torch

        from .modeling import load_causal_lm

        self.model, self.tokenizer, self.device = load_causal_lm(
            model, revision=revision, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        if adapter:
            from peft import PeftModel

            if not (Path(adapter) / "adapter_config.json").exists():
                raise FileNotFoundError(f"{adapter}: no adapter_config.json (not a PEFT adapter folder)")
            peft_model = PeftModel.from_pretrained(self.model, adapter)
            # Merging once makes inference as fast as the base model; keep unmerged to swap adapters.
            self.model = peft_model.merge_and_unload() if merge else peft_model
            self.model.eval()
        self.adapter = adapter
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.max_prompt_tokens = max_prompt_tokens
        self._torch = torch

    def _encode(self, prompts: list[str]):
        from .training import cut_middle

        tok = self.tokenizer
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        rows = []
        for p in prompts:
            # as in training: over the budget, keep the head and the response marker
            rows.append(cut_middle(bos + tok(p, add_special_tokens=False)["input_ids"], self.max_prompt_tokens))
        longest = max(len(r) for r in rows)
        pad = tok.pad_token_id
        ids = self._torch.tensor([[pad] * (longest - len(r)) + r for r in rows], dtype=self._torch.long)
        mask = self._torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in rows], dtype=self._torch.long)
        return ids.to(self.device), mask.to(self.device), [len(r) for r in rows]

    def _batch(self, prompts: list[str]) -> list[Answer]:
        from .prompts import extract_response

        ids, mask, lengths = self._encode(prompts)
        with self._torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=self.max_new_tokens,
                                      do_sample=False, pad_token_id=self.tokenizer.pad_token_id)
        new = out[:, ids.shape[1]:]
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        eos = self.tokenizer.eos_token_id
        answers = []
        for i, text in enumerate(texts):
            row = new[i].tolist()
            n_new = row.index(eos) + 1 if eos in row else len(row)
            answers.append(Answer(extract_response(text), None, lengths[i], n_new))
        return answers

    def answer(self, prompts: list[str]) -> list[Answer]:
        """One answer per prompt, in order; a failing batch is retried prompt by prompt.

        Prompts are batched by length (less padding), answers returned in the caller's order."""
        from .batching import error_text, run_batched

        return run_batched(prompts, self.batch_size, self._batch, lambda e: Answer(None, error_text(e)), sort_key=len)
