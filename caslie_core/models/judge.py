"""Caption quality evaluation (CQE): an LLM judge answers yes/no on whether a caption helps the task.

Two modes. `generate` (as the research code): greedy generation of a few tokens, the answer read from
the first characters; anything that is neither yes nor no is recorded as None. `logits`: one forward
pass; the next-token scores of the yes-tokens and the no-tokens are compared (always yes or no).

Two vote rules (`keep_caption(..., rule=)`). `strict`: yes/no votes (anything else abstains), keep when
yes outnumbers no. `research` (ninglab/CASLIE cqe.py): each reply is cut to a short ballot
(`research_ballot`: "yes", "no", or any other string, each a ballot of its own), the most common ballot
wins (a tie goes to the one seen first in the judges' order) and the caption is kept when it is "yes".
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Literal, Protocol

from ..errors import UsageError
from .chat import RESEARCH_SYSTEM  # noqa: F401  (the research system message; its home is models.chat)

JudgeMode = Literal["logits", "generate"]
JudgeReply = Literal["strict", "research"]
VOTE_RULES = ("strict", "research")
YES_FORMS = ("yes", "Yes", " yes", " Yes", "YES")
NO_FORMS = ("no", "No", " no", " No", "NO")


@dataclass
class Vote:
    vote: str | None  # strict: "yes", "no", or None (neither); research: the ballot (`research_ballot`)
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
        reply: JudgeReply = "strict",
        system_message: str | None = None,
        chat_date: str | None = None,
        label: str = "judge",
    ) -> None:
        """`reply`: how a generated answer becomes a vote (`strict`: yes/no/None by `parse_judge_answer`;
        `research`: the ballot of `research_ballot`, generate mode only). `system_message`: a system turn
        before the question, where the chat template has a system role (else left out, silently). `chat_date`:
        the date the template writes, where it writes one (default the research code's). `label`: the name its
        batch fallbacks are counted under (`judge_<name>`)."""
        import torch

        from .batching import Fallbacks
        from .chat import RESEARCH_DATE
        from .loading import load_causal_lm, supports_system

        if mode not in ("logits", "generate"):
            raise UsageError(f"unknown judge mode {mode!r}; valid: logits, generate")
        if reply not in VOTE_RULES:
            raise UsageError(f"unknown judge reply {reply!r}; valid: {', '.join(VOTE_RULES)}")
        if reply == "research" and mode != "generate":
            raise UsageError(f"judge reply='research' reads a generated answer, but mode={mode!r}; use mode='generate'")
        self.model, self.tokenizer, self.device = load_causal_lm(
            model, revision=revision, dtype=dtype, device=device, trust_remote_code=trust_remote_code
        )
        self.mode = mode
        self.reply = reply
        self.chat_date = chat_date or RESEARCH_DATE
        self.fallbacks = Fallbacks(label)
        self.system_message = system_message
        # The system turn actually sent: None where the chat template has no system role (probed once).
        self._system = system_message if system_message is not None and supports_system(self.tokenizer) else None
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.yes_ids, self.no_ids = answer_token_ids(self.tokenizer)
        if mode == "logits" and (not self.yes_ids or not self.no_ids):
            raise UsageError(f"judge {model}: no token tells yes from no in its vocabulary; use mode=generate")
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
            reply=getattr(j, "reply", "strict"),
            system_message=getattr(j, "system_message", None),
            chat_date=j.chat_date,
            label=f"judge_{j.name}",
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

        # A templated text holds its special tokens: tokenized without adding any, as the tokenizer's own
        # apply_chat_template(tokenize=True) does.
        rendered = [chat_text(self.tokenizer, q, self._system, self.chat_date) for q in questions]
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
        if self.reply == "research":
            return [Vote(research_ballot(t), t) for t in texts]
        return [Vote(parse_judge_answer(t), t) for t in texts]

    def vote(self, questions: list[str]) -> list[Vote]:
        """One vote per question; a batch that raises is retried item by item."""
        from .batching import error_text, run_batched

        return run_batched(
            questions,
            self.batch_size,
            self._batch,
            lambda e: Vote(None, None, error_text(e)),
            fallbacks=self.fallbacks,
            is_error=lambda v: v.error is not None,
        )


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


def research_ballot(text: str | None) -> str:
    """A judge's generated text -> its ballot, as the research code reduces it: the first three
    characters (newlines as spaces, outer spaces off), then spaces, dots and commas off, lower case.
    "Yes." -> "yes", "No" -> "no", "Not really" -> "not", "**Yes**" -> "**y"; None -> ""."""
    if text is None:
        return ""
    return text.replace("\n", " ").strip()[:3].strip().strip(".").strip(",").lower()


def research_winner(ballots: list[str | None]) -> str | None:
    """The most common ballot (None = no ballot: the judge failed); on a tie the one that appeared first
    in the judges' order wins (as `Counter.most_common` orders equal counts). None without ballots."""
    counts = Counter(b for b in ballots if b is not None)
    return counts.most_common(1)[0][0] if counts else None


def plurality(votes: list[str | None]) -> bool:
    """Keep a caption only if `yes` wins the plurality among valid votes (a tie keeps nothing)."""
    yes = sum(v == "yes" for v in votes)
    no = sum(v == "no" for v in votes)
    return yes > no


def keep_caption(caption: str | None, error: dict | None, votes: list[str | None], rule: str = "strict") -> bool:
    """The method's keep rule, for the batch job and the service alike.

    `strict`: a caption exists, its image did not fail, and `yes` outnumbers `no` among the votes.
    `research`: a caption exists and the most common ballot is "yes" (`research_winner`); the image's
    error does not veto (the research code judged a failed caption, "NA", like any other)."""
    if rule == "strict":
        return caption is not None and error is None and plurality(votes)
    if rule == "research":
        return caption is not None and research_winner(votes) == "yes"
    raise UsageError(f"unknown vote rule {rule!r}; valid: {', '.join(VOTE_RULES)}")
