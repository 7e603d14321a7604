"""How an answer is decoded: greedy (the method's, and the default) or sampled, with stop strings."""

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


def finish_reason(n_new_tokens: int, cap: int, stopped: bool) -> str:
    """OpenAI's finish reason of an answer: "length" when it ran into the token cap, else "stop"."""
    return "length" if n_new_tokens >= cap and not stopped else "stop"
