"""Caption quality evaluation (CQE): an LLM judge answers yes/no on whether a caption helps the task.

Two modes. `generate` (as the research code): greedy generation of a few tokens, the answer read from
the first characters; anything that is neither yes nor no is recorded as None. `logits`: one forward
pass; the next-token scores of the yes-tokens and the no-tokens are compared (always yes or no).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

JudgeMode = Literal["logits", "generate"]
YES_FORMS = ("yes", "Yes", " yes", " Yes", "YES")
NO_FORMS = ("no", "No", " no", " No", "NO")


@dataclass
class Vote:
    vote: str | None  # "yes", "no", or None (an answer that is neither)
    raw: str | None = None
    error: str | None = None


def answer_token_ids(tokenizer) -> tuple[list[int], list[int]]:
    """Token ids that start a yes and a no answer: forms that are one token, else each form's first
    token; ids shared by both sides are dropped (they say nothing)."""

    def ids(forms, single_only):
        out = set()
        for form in forms:
            toks = tokenizer(form, add_special_tokens=False)["input_ids"]
            if toks and (len(toks) == 1 or not single_only):
                out.add(toks[0])
        return out

    yes, no = ids(YES_FORMS, True), ids(NO_FORMS, True)
    if not yes or not no:
        yes, no = yes or ids(YES_FORMS, False), no or ids(NO_FORMS, False)
    shared = yes & no
    return sorted(yes - shared), sorted(no - shared)


class VoteModel(Protocol):
    """What the judge stage and the service need of a judge (a real one, or a fake in tests)."""

    def vote(self, questions: list[str]) -> list[Vote]: ...


class Judge:
    def __init__(
        self,
        model: str,
        *,
        mode: JudgeMode = "logits",
        revision: str | None = None,
        dtype: str = "auto",
        device: str = "auto",
        max_new_tokens: int = 16,
        batch_size: int = 16,
        trust_remote_code: bool = False,
    ) -> None:
        import torch

        from .loading import load_causal_lm

        if mode not in ("logits", "generate"):
            raise ValueError(f"unknown judge mode {mode!r}; valid: logits, generate")
        self.model, self.tokenizer, self.device = load_causal_lm(
            model, revision=revision, dtype=dtype, device=device, trust_remote_code=trust_remote_code
        )
        self.mode = mode
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.yes_ids, self.no_ids = answer_token_ids(self.tokenizer)
        if mode == "logits" and (not self.yes_ids or not self.no_ids):
            raise ValueError(f"judge {model}: no token tells yes from no in its vocabulary; use mode=generate")
        self._torch = torch
        self._keep_last = True  # ask the model for the last position's logits only (until it refuses)

    @classmethod
    def from_config(cls, j, *, batch_size: int | None = None) -> Judge:
        """From a judge config section (`JudgeConfig` or the service's `ServeJudgeConfig`)."""
        return cls(
            j.model,
            mode=j.mode,
            revision=j.revision,
            dtype=j.dtype,
            max_new_tokens=j.max_new_tokens,
            batch_size=batch_size or getattr(j, "micro_batch", 16),
            trust_remote_code=j.trust_remote_code,
        )

    def _last_logits(self, enc):
        """Next-token logits at the last position. `logits_to_keep=1` skips the LM head on every other
        position: with a 128k vocabulary, batch 64 and 512 tokens, full logits would be ~8 GB in bf16."""
        if self._keep_last:
            try:
                return self.model(**enc, logits_to_keep=1).logits[:, -1, :].float()
            except TypeError:  # a model class (remote code) without the argument
                self._keep_last = False
        return self.model(**enc).logits[:, -1, :].float()

    def _encode(self, questions: list[str]):
        from .loading import chat_text

        rendered = [chat_text(self.tokenizer, q) for q in questions]
        texts = [t for t, _ in rendered]
        templated = rendered[0][1] if rendered else False
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not templated)
        return {k: v.to(self.device) for k, v in enc.items()}

    def _batch(self, questions: list[str]) -> list[Vote]:
        enc = self._encode(questions)
        with self._torch.inference_mode():
            if self.mode == "logits":
                logits = self._last_logits(enc)
                yes = logits[:, self.yes_ids].max(dim=-1).values
                no = logits[:, self.no_ids].max(dim=-1).values
                return [
                    Vote("yes" if y > n else "no", f"yes={y:.3f} no={n:.3f}") for y, n in zip(yes.tolist(), no.tolist())
                ]
            out = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False)
        texts = self.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        return [Vote(parse_judge_answer(t), t) for t in texts]

    def vote(self, questions: list[str]) -> list[Vote]:
        """One vote per question; a batch that raises is retried item by item."""
        from .batching import error_text, run_batched

        return run_batched(questions, self.batch_size, self._batch, lambda e: Vote(None, None, error_text(e)))


def parse_judge_answer(text: str | None) -> str | None:
    """A judge's generated text -> `yes`, `no`, or None when it is neither."""
    if not text:
        return None
    head = text.strip().lstrip("\"'*`([ ").lower()
    if head.startswith("yes"):
        return "yes"
    if head.startswith("no"):
        return "no"
    return None


def plurality(votes: list[str | None]) -> bool:
    """Keep a caption only if `yes` wins the plurality among valid votes (a tie keeps nothing)."""
    yes = sum(v == "yes" for v in votes)
    no = sum(v == "no" for v in votes)
    return yes > no


def keep_caption(caption: str | None, error: dict | None, votes: list[str | None]) -> bool:
    """The method's keep rule, for the batch job and the service alike: a caption exists, its image did
    not fail, and `yes` wins the plurality of the judges' votes."""
    return caption is not None and error is None and plurality(votes)
