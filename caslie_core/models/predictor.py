"""Answering instruction prompts with a base model and an optional LoRA adapter (batched greedy).

Used by the evaluation job, the serving deployment and the training job's learnability checks.
As the research code: greedy decoding, up to 100 new tokens, the answer read after the response marker.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .sampling import GREEDY, Sampling, cut_at_stop, finish_reason


@dataclass
class Answer:
    text: str | None
    error: str | None = None
    n_prompt_tokens: int = 0
    n_new_tokens: int = 0
    raw: str | None = None  # the generated text before the answer is read from it
    stopped: bool = False  # the answer ended at the response marker or a stop string (not at the token cap)
    finish_reason: str = "stop"  # OpenAI's: "length" when the token cap ended it (`finish_reason`)


def read_text(path: str) -> str | None:
    """A small file's text, local or any fsspec URL; None when it does not exist."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    return fs.cat_file(root).decode() if fs.exists(root) else None


def local_copy(path: str | None) -> str | None:
    """Adapters on s3:// (or any URL) are copied to a local temp folder; local paths are used as they are."""
    if not path or "://" not in path:
        return path
    import tempfile

    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    dest = tempfile.mkdtemp(prefix="caslie-adapter-")
    fs.get(root.rstrip("/") + "/", dest, recursive=True)
    return dest


@dataclass(frozen=True)
class ModelSource:
    """What to load for a model section: the base model, an optional adapter, and the prompt template."""

    base: str
    adapter: str | None
    revision: str | None
    style: str
    source: str  # train_output | adapter | model_folder | model

    def as_dict(self) -> dict:
        return {
            "base": self.base,
            "adapter": self.adapter,
            "revision": self.revision,
            "style": self.style,
            "source": self.source,
        }


def resolve_model_source(m) -> ModelSource:
    """What to load for a model section (`path`, `model`, `revision`, `prompt_style`), from the config and
    what the path holds: a training output folder (adapter/ + resolved_config.yaml), a PEFT adapter
    folder, or a model folder."""
    import json

    import yaml

    from ..errors import ConfigError
    from ..prompts import default_style_for

    base, adapter, revision, style, source = m.model, None, m.revision, None, "model"
    if m.path:
        p = m.path.rstrip("/")
        resolved = read_text(p + "/resolved_config.yaml")
        if read_text(p + "/adapter/adapter_config.json") is not None:
            adapter, source = p + "/adapter", "train_output"
            if resolved:
                recorded = yaml.safe_load(resolved).get("model", {})
                base = base or recorded.get("model")
                revision = revision or recorded.get("revision")
                style = recorded.get("prompt_style")
        elif (text := read_text(p + "/adapter_config.json")) is not None:
            adapter, source = p, "adapter"
            base = base or json.loads(text).get("base_model_name_or_path")
        elif read_text(p + "/config.json") is not None:
            base, source = p, "model_folder"
        else:
            raise ConfigError(
                [
                    f"model.path: {m.path} holds no adapter/ (training output), adapter_config.json "
                    "(adapter) or config.json (model)"
                ]
            )
        if not base:
            raise ConfigError([f"model.path: {m.path} does not say its base model; set model.model"])
    if m.prompt_style != "auto":
        style = m.prompt_style
    elif not style or style == "auto":
        style = default_style_for(base)
    return ModelSource(base=base, adapter=adapter, revision=revision, style=style, source=source)


class Predictor:
    """Batched left-padded greedy generation; `adapter` is a PEFT folder (or None for the base model)."""

    def __init__(
        self,
        model: str,
        *,
        adapter: str | None = None,
        revision: str | None = None,
        dtype: str = "auto",
        device: str = "auto",
        max_new_tokens: int = 100,
        batch_size: int = 16,
        max_prompt_tokens: int = 2048,
        merge: bool = True,
        trust_remote_code: bool = False,
        style: str = "alpaca",
        prefix_cache: bool = True,
    ) -> None:
        import torch

        from .batching import Fallbacks
        from .loading import load_causal_lm
        from .prefix import PrefixCache

        self.model, self.tokenizer, self.device = load_causal_lm(
            model, revision=revision, dtype=dtype, device=device, trust_remote_code=trust_remote_code
        )
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
        self.style = style  # the prompt template: its response marker ends an answer
        self.sampling = GREEDY  # the method's decoding; AdapterPredictor sets a request's own per call
        self.prefix = PrefixCache(self.tokenizer, style) if prefix_cache else None
        self.active: str | None = None  # the adapter generating now (None: the base or merged model)
        self.fallbacks = Fallbacks("predictor")
        self._torch = torch

    def _encode(self, prompts: list[str]):
        """Ids and attention mask of a batch, each prompt's length, and whether it shares the template's head:
        left-padded, or laid out around the head when every prompt begins with it (`prefix.PrefixCache`; then
        `_past` gives the head's cache)."""
        from .loading import cut_middle

        tok = self.tokenizer
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        rows = []
        for p in prompts:
            # as in training: over the budget, keep the head and the response marker
            rows.append(cut_middle(bos + tok(p, add_special_tokens=False)["input_ids"], self.max_prompt_tokens))
        longest = max(len(r) for r in rows)
        pad = tok.pad_token_id
        shared = self.prefix is not None and self.prefix.fits(rows)
        if shared:
            ids, mask = self.prefix.layout(rows, pad)
        else:
            ids = [[pad] * (longest - len(r)) + r for r in rows]
            mask = [[0] * (longest - len(r)) + [1] * len(r) for r in rows]
        as_tensor = self._torch.tensor
        lengths = [len(r) for r in rows]
        return as_tensor(ids).to(self.device), as_tensor(mask).to(self.device), lengths, shared

    def _past(self, shared: bool, rows: int) -> dict:
        """generate()'s cache for a batch that `_encode` laid out around the template's head: a copy of the head's
        key/value cache for the adapter in use (computed on first use). Call it in inference mode with the
        adapter selected."""
        if not shared:
            return {}
        past = self.prefix.cache(self.model, self.active, rows, self.device)
        return {"cache": past} if past is not None else {}  # transformers 6 drops the name past_key_values

    def stops(self, sampling: Sampling) -> tuple[str, ...]:
        """Where an answer ends: the template's response marker (`extract_response`), then the request's stops."""
        from ..prompts import response_marker

        return (response_marker(self.style), *sampling.stop)

    def _batch(self, prompts: list[str]) -> list[Answer]:
        sampling = self.sampling
        ids, mask, lengths, shared = self._encode(prompts)
        with self._torch.inference_mode():
            sampling.seed_rng(self._torch)
            out = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=self.max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id,
                **self._past(shared, len(prompts)),
                **sampling.generate_kwargs(),
            )
        new = out[:, ids.shape[1] :]
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        eos = self.tokenizer.eos_token_id
        answers = []
        for i, text in enumerate(texts):
            row = new[i].tolist()
            n_new = row.index(eos) + 1 if eos in row else len(row)
            answer, hit = cut_at_stop(text, self.stops(sampling))  # greedy, no stops: `extract_response`
            answers.append(Answer(answer.strip(), None, lengths[i], n_new, text, hit or eos in row))
        return answers

    def answer(self, prompts: list[str]) -> list[Answer]:
        """One answer per prompt, in order; a failing batch is retried prompt by prompt.

        Prompts are batched by length (less padding), answers returned in the caller's order."""
        from .batching import error_text, run_batched

        return run_batched(
            prompts,
            self.batch_size,
            self._batch,
            lambda e: Answer(None, error_text(e)),
            sort_key=len,
            fallbacks=self.fallbacks,
            is_error=lambda a: a.error is not None,
        )


class AdapterPredictor(Predictor):
    """One base model with several LoRA adapters loaded side by side; each call names the adapter to use
    (None = the base model alone). Thread-safe: loading, unloading and answering take one lock."""

    @classmethod
    def from_spec(cls, spec: dict, *, batch_size: int = 8) -> AdapterPredictor:
        """From the service's predictor spec (`caslie_core.serving.spec.app_spec(...)["predictor"]`)."""
        return cls(
            spec["base"],
            revision=spec["revision"],
            dtype=spec["dtype"],
            max_new_tokens=spec["max_new_tokens"],
            batch_size=batch_size,
            max_prompt_tokens=spec["max_prompt_tokens"],
            trust_remote_code=spec["trust_remote_code"],
            style=spec.get("style", "alpaca"),
            prefix_cache=spec.get("prefix_cache", True),
        )

    def __init__(self, model: str, **kwargs) -> None:
        import threading

        kwargs.pop("adapter", None)
        kwargs.pop("merge", None)
        super().__init__(model, **kwargs)
        self.base = self.model
        self.cap = self.max_new_tokens
        self.peft = None
        self.loaded: dict[str, str] = {}
        self._lock = threading.Lock()

    def load(self, name: str, path: str) -> None:
        from peft import PeftModel

        if not (Path(path) / "adapter_config.json").exists():
            raise FileNotFoundError(f"{path}: no adapter_config.json (not a PEFT adapter folder)")
        with self._lock:
            if name in self.loaded:
                return
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.base, path, adapter_name=name).eval()
            elif name not in self.peft.peft_config:  # else: unloaded last, its weights are still there
                self.peft.load_adapter(path, adapter_name=name)
            self.loaded[name] = path
            self._drop_stale()
            self._forget(name)

    def unload(self, name: str) -> None:
        with self._lock:
            self.loaded.pop(name, None)
            self._drop_stale()
            self._forget(name)

    def _forget(self, name: str) -> None:
        """The template head's cache for `name` is of weights that changed (loaded or unloaded): computed anew."""
        if self.prefix is not None:
            self.prefix.forget(name)

    def _drop_stale(self) -> None:
        """Delete adapters no longer loaded; PEFT cannot delete its last one (nor unload it without keeping
        its modules_to_save), so that one stays, unused, until another adapter is loaded."""
        for stale in [n for n in self.peft.peft_config if n not in self.loaded] if self.peft else []:
            if len(self.peft.peft_config) == 1:
                break
            if self.peft.active_adapter == stale:
                self.peft.set_adapter(next(n for n in self.peft.peft_config if n != stale))
            self.peft.delete_adapter(stale)

    def _select(self, adapter: str | None):
        """Point `self.model` at `adapter` (None = the base model); the context to generate in (lock held)."""
        import contextlib

        if adapter is not None and adapter not in self.loaded:
            raise KeyError(f"adapter {adapter!r} is not loaded (loaded: {sorted(self.loaded)})")
        self.active = adapter
        if self.peft is None:
            self.model = self.base
            return contextlib.nullcontext()
        if adapter is None:
            self.model = self.peft
            return self.peft.disable_adapter()
        self.peft.set_adapter(adapter)
        self.model = self.peft
        return contextlib.nullcontext()

    def answer(
        self,
        prompts: list[str],
        adapter: str | None = None,
        max_new_tokens: int | None = None,
        sampling: Sampling | dict | None = None,
    ) -> list[Answer]:
        """Answers with `adapter` (None = the base model); `max_new_tokens` may lower the configured cap;
        `sampling` (default greedy, the method's) applies to every prompt of the call."""
        with self._lock:
            self.max_new_tokens = self.cap_for(max_new_tokens)
            self.sampling = Sampling.of(sampling)
            with self._select(adapter):
                answers = super().answer(prompts)
            for a in answers:
                a.finish_reason = finish_reason(a.n_new_tokens, self.max_new_tokens, a.stopped)
            return answers

    def cap_for(self, max_new_tokens: int | None) -> int:
        """The token cap of a request: what it asks for (None = the configured cap), never above the configured."""
        return min(max_new_tokens or self.cap, self.cap)

    def stream(self, prompt: str, adapter=None, max_new_tokens=None, sampling=None, cancel=None):
        """One answer as it is generated: `{"delta": text}` events whose texts add up to what `answer` gives,
        then `{"done": True, "n_prompt_tokens", "n_new_tokens", "finish_reason"}`. Setting `cancel` (a
        threading.Event; a client that went away) stops the generation at the next token. Several at once:
        `streaming.stream_answers`."""
        from .streaming import stream_answers

        for rows in stream_answers(self, [prompt], adapter, max_new_tokens, sampling, [cancel] if cancel else None):
            yield from rows[0]
