"""Answers streamed as they are generated, several at once: a batch of prompts shares each decoding step (as the
non-streamed answers do), and each row's text is handed out token by token, cut and stripped exactly as its
non-streamed answer is, so that the pieces add up to it."""

from __future__ import annotations

import queue
import threading

from .sampling import Sampling, cut_at_stop, finish_reason


class StreamText:
    """Turns the raw pieces of a generation into the deltas of the answer a client sees: the text after the
    prompt's response marker is cut at the marker or a stop string, and stripped, exactly as the non-streamed
    answer is (`extract_response` + `cut_at_stop`). Only an end that might begin a stop string, and trailing
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
        safe = text[: max(self.sent, len(text) - self._partial_stop(text))].rstrip()
        return self._release(safe)

    def _partial_stop(self, text: str) -> int:
        """How many characters at the end of `text` could be the start of a stop string (held back)."""
        hold = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), hold, -1):
                if text.endswith(stop[:k]):
                    hold = k
                    break
        return hold

    def finish(self) -> str:
        """The rest of the answer once generation has ended (nothing after a stop string was met)."""
        return "" if self.stopped else self._release(self._answer().rstrip())

    def _release(self, upto: str) -> str:
        if len(upto) <= self.sent:
            return ""
        delta, self.sent = upto[self.sent :], len(upto)
        return delta


class StepRows:
    """The rows of one streamed generation, as generate()'s stopping criterion: called after every decoding step
    with the ids so far (each row's new token last), it turns each row's new token into text (transformers' own
    streamers take one row and wait for a space; a run of tokens without one would arrive at once; a token that
    ends inside a UTF-8 character waits for the next), hands the step's events to `emit`, and says which rows are
    over, so a stop string or a cancel ends its row at the very step that made it (the streamer hook would see the
    token after the criteria had run: one decoding step more)."""

    def __init__(self, tokenizer, texts: list[StreamText], cancels, lengths: list[int], cap: int, emit) -> None:
        self.tokenizer, self.texts, self.cancels, self.emit = tokenizer, texts, cancels, emit
        self.lengths, self.cap = lengths, cap
        n = len(texts)
        self.ids: list[list[int]] = [[] for _ in range(n)]
        # incremental detokenization (as vLLM does): each step decodes only the ids from `start` on, the text of
        # ids[start:done] being what was handed out already; decoding a whole row every step grows with its length
        self.start, self.done = [0] * n, [0] * n
        self.eos = tokenizer.eos_token_id
        self.ended = [False] * n  # the row made its end-of-sequence token
        self.over = [False] * n  # the row's done event was sent

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        out: list[list] = [[] for _ in self.texts]
        for row, token in enumerate(input_ids[:, -1].tolist()):
            if self.over[row]:
                continue
            if not self.ended[row]:
                self.ids[row].append(int(token))
                self.ended[row] = int(token) == self.eos
            self._feed(row, self._piece(row, final=False), out[row])
            if self.texts[row].stopped or self.ended[row] or self.cancels[row].is_set():
                self._finish(row, out[row])
        self.emit(out)
        return torch.tensor(self.over, dtype=torch.bool, device=input_ids.device)

    def close(self) -> None:
        """After generate(): what is left of each row (a held UTF-8 tail, held whitespace) and the done events."""
        out: list[list] = [[] for _ in self.texts]
        for row in range(len(self.texts)):
            if not self.over[row]:
                self._feed(row, self._piece(row, final=True), out[row])
                self._finish(row, out[row])
        self.emit(out)

    def _feed(self, row: int, piece: str, events: list) -> None:
        if piece and (delta := self.texts[row].feed(piece)):
            events.append({"delta": delta})

    def _finish(self, row: int, events: list) -> None:
        if delta := self.texts[row].finish():
            events.append({"delta": delta})
        made = len(self.ids[row])
        ended = self.texts[row].stopped or self.ended[row]
        events.append(
            {
                "done": True,
                "n_prompt_tokens": self.lengths[row],
                "n_new_tokens": made,
                "finish_reason": finish_reason(made, self.cap, ended),
            }
        )
        self.over[row] = True

    def _piece(self, row: int, *, final: bool) -> str:
        """The row's text that its new ids add: decoded with a few ids before them (a token's text may depend on
        the one before it, e.g. a leading space), held back while it ends inside a UTF-8 character (unless final)."""
        ids, start, done = self.ids[row], self.start[row], self.done[row]
        before = self.tokenizer.decode(ids[start:done], skip_special_tokens=True)
        text = self.tokenizer.decode(ids[start:], skip_special_tokens=True)
        if (final or not text.endswith("\ufffd")) and len(text) > len(before):
            self.start[row], self.done[row] = max(start, done - 4), len(ids)
            return text[len(before) :]
        return ""


def generate_streams(
    predictor, prompts: list[str], emit, adapter=None, max_new_tokens=None, sampling=None, cancels=None
) -> None:
    """Generate answers to `prompts` together with `predictor` (an AdapterPredictor) in the calling thread, calling
    `emit` after each decoding step with one list of events per prompt (often empty): `{"delta": text}`, and once
    the row is over `{"done": True, "n_prompt_tokens", "n_new_tokens", "finish_reason"}`. A row ends at its
    end-of-sequence token, the response marker or a stop string, the token cap, or its cancel event (a client that
    went away); generation stops when every row has ended. A failure of the generation is raised. `emit` runs in
    the generating thread between steps: hand the events on (a queue, `loop.call_soon_threadsafe`), do not wait."""
    import torch
    from transformers import StoppingCriteriaList

    sampling = Sampling.of(sampling)
    cancels = cancels or [threading.Event() for _ in prompts]
    with predictor._lock:  # the adapter choice is the model's state: one generation at a time per replica
        cap = predictor.cap_for(max_new_tokens)
        ctx = predictor._select(adapter)
        ids, mask, lengths, shared = predictor._encode(prompts)
        texts = [StreamText(predictor.stops(sampling)) for _ in prompts]
        rows = StepRows(predictor.tokenizer, texts, cancels, lengths, cap, emit)
        with ctx, torch.inference_mode():
            sampling.seed_rng(torch)
            predictor.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=cap,
                pad_token_id=predictor.tokenizer.pad_token_id,
                stopping_criteria=StoppingCriteriaList([rows]),
                **predictor._past(shared, len(prompts)),
                **sampling.generate_kwargs(),
            )
        rows.close()


def stream_answers(predictor, prompts: list[str], adapter=None, max_new_tokens=None, sampling=None, cancels=None):
    """`generate_streams` as an iterator: yields each step's list of events per prompt, generating in a thread of
    its own; closing the iterator early cancels every row (generation stops at the next token)."""
    cancels = cancels or [threading.Event() for _ in prompts]
    steps: queue.Queue = queue.Queue()
    failed: list[BaseException] = []

    def run() -> None:
        try:
            generate_streams(predictor, prompts, steps.put, adapter, max_new_tokens, sampling, cancels)
        except Exception as e:  # noqa: BLE001 - raised in the consumer's thread below
            failed.append(e)
        finally:
            steps.put(None)

    worker = threading.Thread(target=run, name="caslie-stream", daemon=True)
    worker.start()
    try:
        while (step := steps.get()) is not None:
            yield step
        if failed:
            raise failed[0]
    finally:
        for cancel in cancels:
            cancel.set()
        worker.join()
