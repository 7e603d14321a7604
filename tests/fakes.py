"""Deterministic stand-ins for the captioner and the judges: the models' interfaces, no torch.

Stage-contract tests run the real stages on them; what they return follows rules the tests can compute:

- `FakeCaptioner.caption(images, prompts)`: "caption <image sha1[:8]>/<prompt sha1[:6]> of <first words>";
- `FakeJudge.vote(questions)`: "yes" when the rule holds for the question (a word in it, or a predicate), else "no".

Both count what they were asked (`calls`, `items`) and can fail chosen items the way the real models do
(a result carrying `error`), or raise on every call (a model that crashes the batch).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from caslie_core.models.batching import Fallbacks
from caslie_core.models.captioner import CaptionResult
from caslie_core.models.judge import Vote

CAPTION_ERROR = "RuntimeError: fake captioner failure"
JUDGE_ERROR = "RuntimeError: fake judge failure"


def image_bytes(image: Any) -> bytes:
    """The bytes an image is made of: numpy arrays and PIL images (`tobytes`) or bytes-like objects."""
    if hasattr(image, "tobytes"):
        return image.tobytes()
    return bytes(image)


def sha1(data: bytes | str) -> str:
    return hashlib.sha1(data.encode() if isinstance(data, str) else data).hexdigest()


def fake_caption(image: Any, prompt: str, *, words: int = 4) -> str:
    """The caption `FakeCaptioner` gives `image` for `prompt` (tests compute expectations with it)."""
    head = " ".join(prompt.split()[:words])
    return f"caption {sha1(image_bytes(image))[:8]}/{sha1(prompt)[:6]} of {head}"


def _failing(rule: set[int] | Callable[..., bool] | None, position: int, *args) -> bool:
    if rule is None:
        return False
    if callable(rule):
        return bool(rule(*args))
    return position in rule


class FakeCaptioner:
    """`.caption(images, prompts) -> list[CaptionResult]`, deterministic in (image bytes, prompt).

    fail_on: item positions (0-based, counted over all calls in the order received) or a predicate
        `(image, prompt) -> bool`; those items come back as `CaptionResult(None, error=CAPTION_ERROR)`.
    raise_always: every call raises RuntimeError (after counting it).
    raise_on: a predicate `(image, prompt) -> bool`; a call holding such an item raises RuntimeError (a model
        that crashes on one item and takes its batch with it).
    """

    def __init__(
        self,
        *,
        fail_on: set[int] | Callable[[Any, str], bool] | None = None,
        raise_always: bool = False,
        raise_on: Callable[[Any, str], bool] | None = None,
        words: int = 4,
    ) -> None:
        self.fail_on = fail_on
        self.raise_always = raise_always
        self.raise_on = raise_on
        self.words = words
        self.fallbacks = Fallbacks("captioner")  # as the real one: a call that raises is counted by the stage
        self.calls = 0  # caption() calls
        self.items = 0  # images captioned (or attempted), over all calls
        self.prompts: list[str] = []  # every prompt received, in order

    def caption(self, images: list[Any], prompts: list[str]) -> list[CaptionResult]:
        if len(images) != len(prompts):  # as the real captioner
            raise ValueError(f"{len(images)} image(s) for {len(prompts)} prompt(s)")
        self.calls += 1
        if self.raise_always:
            raise RuntimeError("fake captioner: the whole batch crashed")
        if self.raise_on is not None and any(self.raise_on(i, p) for i, p in zip(images, prompts)):
            raise RuntimeError("fake captioner: raised on one item")
        out = []
        for image, prompt in zip(images, prompts):
            position = self.items
            self.items += 1
            self.prompts.append(prompt)
            if _failing(self.fail_on, position, image, prompt):
                out.append(CaptionResult(None, error=CAPTION_ERROR))
            else:
                out.append(CaptionResult(fake_caption(image, prompt, words=self.words)))
        return out


class FakeJudge:
    """`.vote(questions) -> list[Vote]`: "yes" when `yes_if` holds for the question, else "no".

    yes_if: a word (yes when the question contains it) or a predicate `question -> bool`.
    fail_on: item positions (0-based, over all calls) or a predicate `question -> bool`; those items come
        back as `Vote(None, None, error=JUDGE_ERROR)`, as the real judge returns a batch item that failed.
    raise_always: every call raises RuntimeError (after counting it).
    raise_on: a predicate `question -> bool`; a call holding such a question raises RuntimeError.
    """

    def __init__(
        self,
        yes_if: str | Callable[[str], bool] = "yes",
        *,
        fail_on: set[int] | Callable[[str], bool] | None = None,
        raise_always: bool = False,
        raise_on: Callable[[str], bool] | None = None,
    ) -> None:
        self.yes_if = yes_if
        self.fail_on = fail_on
        self.raise_always = raise_always
        self.raise_on = raise_on
        self.calls = 0
        self.items = 0
        self.questions: list[str] = []

    def rule(self, question: str) -> str:
        """The vote this judge gives `question` when the item does not fail."""
        yes = self.yes_if(question) if callable(self.yes_if) else self.yes_if in question
        return "yes" if yes else "no"

    def vote(self, questions: list[str]) -> list[Vote]:
        self.calls += 1
        if self.raise_always:
            raise RuntimeError("fake judge: the whole batch crashed")
        if self.raise_on is not None and any(self.raise_on(q) for q in questions):
            raise RuntimeError("fake judge: raised on one item")
        out = []
        for q in questions:
            position = self.items
            self.items += 1
            self.questions.append(q)
            if _failing(self.fail_on, position, q):
                out.append(Vote(None, None, JUDGE_ERROR))
            else:
                vote = self.rule(q)
                out.append(Vote(vote, f"fake: {vote}"))
        return out


def slow_loading(seconds: float, make: Callable[[], Any]) -> Any:
    """`make()` after `seconds`: a model that takes its time to load (a big checkpoint), for the stall watch."""
    import time

    time.sleep(seconds)
    return make()


class CaptionerRaisingOnce:
    """The real tiny captioner, except that its first batch of several images raises (a model that crashes on one
    item and takes its batch with it): the stage redoes that batch item by item, and counts it (`fallbacks`)."""

    def __init__(self, **kwargs) -> None:
        from caslie_core.models.captioner import Captioner

        self.inner = Captioner("tiny:captioner", **{"max_new_tokens": 8, "batch_size": 16, **kwargs})
        self.raised = False
        self.fallbacks = Fallbacks("captioner")

    def caption(self, images: list[Any], prompts: list[str]) -> list[CaptionResult]:
        if len(prompts) > 1 and not self.raised:
            self.raised = True
            raise RuntimeError("captioner: raised on one item")
        return self.inner.caption(images, prompts)


class Logged:
    """A real model, built by `make` when this is constructed, that appends to the file `log` a line "load" then
    one line per item it is asked about ("caption" or "vote"): model loads and calls counted across actors."""

    def __init__(self, make: Callable[[], Any], log: str) -> None:
        self.log = log
        self._write("load\n")
        self.inner = make()

    def _write(self, text: str) -> None:
        with open(self.log, "a") as fh:  # one short append per call: whole lines from any number of processes
            fh.write(text)

    def caption(self, images, prompts):
        self._write("caption\n" * len(images))
        return self.inner.caption(images, prompts)

    def vote(self, questions):
        self._write("vote\n" * len(questions))
        return self.inner.vote(questions)

    def __getattr__(self, name: str):
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)
