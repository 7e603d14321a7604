"""How an answer is decoded: greedy (the method's, and the default) or sampled, with stop strings; and the text
of a streamed answer released piece by piece so that the pieces add up to exactly the non-streamed answer."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Decoding settings of one request. `temperature` None or 0 = greedy (top_p and seed are then moot)."""

    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return not self.temperature

    def generate_kwargs(self) -> dict:
        if self.greedy:
            return {"do_sample": False}
        kwargs = {"do_sample": True, "temperature": float(self.temperature)}
        if self.top_p is not None:
            kwargs["top_p"] = float(self.top_p)
        return kwargs

    def seed_rng(self, torch) -> None:
        """A seeded request draws the same answer again (the caller holds the model's lock)."""
        if not self.greedy and self.seed is not None:
            torch.manual_seed(self.seed)

    @classmethod
    def of(cls, value) -> Sampling:
        if value is None or isinstance(value, Sampling):
            return value or cls()
        return cls(**{**value, "stop": tuple(value.get("stop") or ())})


GREEDY = Sampling()


def cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """`text` up to the first stop string (left out, as OpenAI does) and whether one was found."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


class StreamText:
    """Turns the raw pieces of a generation into the deltas of the answer a client sees: the text after the
    prompt's response marker is cut at the marker or a stop string, and stripped, exactly as the non-streamed
    answer is (`extract_response` + `cut_at_stop`). A piece that might begin a stop string, and trailing
    whitespace, are held back until the text after them shows what they are."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.raw = ""
        self.sent = 0  # characters of the answer (stripped on the left) already released
        self.stopped = False

    def _answer(self) -> str:
        text, self.stopped = cut_at_stop(self.raw, self.stops)
        return text.lstrip()

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.raw += piece
        text = self._answer()
        if self.stopped:
            return self._release(text.rstrip())
        hold = max((len(s) - 1 for s in self.stops), default=0)
        safe = text[: max(self.sent, len(text) - hold)].rstrip()
        return self._release(safe)

    def finish(self) -> str:
        """The rest of the answer once generation has ended (nothing after a stop string was met)."""
        return "" if self.stopped else self._release(self._answer().rstrip())

    def _release(self, upto: str) -> str:
        if len(upto) <= self.sent:
            return ""
        delta, self.sent = upto[self.sent :], len(upto)
        return delta
