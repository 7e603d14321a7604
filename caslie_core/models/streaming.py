"""Answers streamed as they are generated, several at once: a batch of prompts shares each decoding step (as the
non-streamed answers do), and each row's text is handed out token by token, cut and stripped exactly as its
non-streamed answer is, so that the pieces add up to it."""

from __future__ import annotations

import queue
import threading

from .sampling import Sampling, cut_at_stop


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


class BatchTokenStreamer:
    """A `generate(streamer=...)` target for a batch: after each decoding step, every row's new text (transformers'
    own streamers take one row and wait for a space; a run of tokens without one would arrive at once), handed to
    `on_pieces` in the generating thread. A token that ends inside a UTF-8 character waits for the next."""

    def __init__(self, tokenizer, rows: int, on_pieces) -> None:
        self.tokenizer, self.on_pieces = tokenizer, on_pieces
        self.ids: list[list[int]] = [[] for _ in range(rows)]
        self.text = [""] * rows
        self.eos = tokenizer.eos_token_id
        self.ended = [False] * rows  # the row made its end-of-sequence token
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate() first puts the prompts
            self.prompt_seen = True
            return
        pieces = []
        for row, token in enumerate(value.reshape(-1).tolist()):
            if not self.ended[row]:
                self.ids[row].append(int(token))
                self.ended[row] = int(token) == self.eos
            pieces.append(self._piece(row, final=False))
        self.on_pieces(pieces)

    def end(self) -> None:
        self.on_pieces([self._piece(row, final=True) for row in range(len(self.ids))])

    def _piece(self, row: int, *, final: bool) -> str:
        text = self.tokenizer.decode(self.ids[row], skip_special_tokens=True)
        if (final or not text.endswith("\ufffd")) and len(text) > len(self.text[row]):
            piece, self.text[row] = text[len(self.text[row]) :], text
            return piece
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
    from transformers import StoppingCriteria, StoppingCriteriaList

    sampling = Sampling.of(sampling)
    n = len(prompts)
    cancels = cancels or [threading.Event() for _ in prompts]
    with predictor._lock:  # the adapter choice is the model's state: one generation at a time per replica
        cap = min(max_new_tokens or predictor.cap, predictor.cap)
        ctx = predictor._select(adapter)
        ids, mask, lengths, shared = predictor._encode(prompts)
        texts = [StreamText(predictor.stops(sampling)) for _ in prompts]
        over = [False] * n

        def finish(row: int, events: list) -> None:
            if delta := texts[row].finish():
                events.append({"delta": delta})
            made = len(streamer.ids[row])
            ended = texts[row].stopped or streamer.ended[row] or made < cap
            events.append(
                {
                    "done": True,
                    "n_prompt_tokens": lengths[row],
                    "n_new_tokens": made,
                    "finish_reason": "stop" if ended else "length",
                }
            )
            over[row] = True

        def on_pieces(pieces: list[str]) -> None:
            out: list[list] = [[] for _ in prompts]
            for row, piece in enumerate(pieces):
                if over[row]:
                    continue
                if piece and (delta := texts[row].feed(piece)):
                    out[row].append({"delta": delta})
                if texts[row].stopped or streamer.ended[row] or cancels[row].is_set():
                    finish(row, out[row])
            emit(out)

        class _RowsOver(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                rows = [over[r] or cancels[r].is_set() for r in range(n)]
                return torch.tensor(rows, dtype=torch.bool, device=input_ids.device)

        streamer = BatchTokenStreamer(predictor.tokenizer, n, on_pieces)
        with ctx, torch.inference_mode():
            sampling.seed_rng(torch)
            predictor.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=cap,
                pad_token_id=predictor.tokenizer.pad_token_id,
                streamer=streamer,
                stopping_criteria=StoppingCriteriaList([_RowsOver()]),
                **predictor._past(shared, n),
                **sampling.generate_kwargs(),
            )
        out = [[] for _ in prompts]
        for row in range(n):
            if not over[row]:
                finish(row, out[row])
        emit(out)


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
