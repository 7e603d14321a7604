"""Context-conditioned captioning (EC3) with any Hugging Face image-text-to-text model.

`Captioner.caption(images, prompts)` runs batched, left-padded, greedy generation and returns one
`CaptionResult` per image. A batch that raises is retried item by item, so one bad input fails alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from ..prompts import clean_caption


@dataclass
class CaptionResult:
    """`caption` is None both for an empty caption (no caption, not an error) and for a failure (`error`)."""

    caption: str | None
    error: str | None = None


class CaptionModel(Protocol):
    """What the caption stage and the service need of a captioner (a real one, or a fake in tests)."""

    def caption(self, images: list, prompts: list[str]) -> list[CaptionResult]: ...


# How a processor WITHOUT a chat template wants one image and its request written. BLIP-2's processors insert the
# image's query tokens themselves (an `<image>` of ours would be one too many); PaliGemma's expands `<image>` and
# adds BOS and the closing newline itself (its own layout has no newline after the image). Any other processor
# (a LLaVA checkpoint saved without a template): the image token on a line of its own.
PLAIN_LAYOUTS = {
    "Blip2Processor": "{prompt}",
    "InstructBlipProcessor": "{prompt}",
    "PaliGemmaProcessor": "{image}{prompt}",
}
DEFAULT_LAYOUT = "{image}\n{prompt}"


class Captioner:
    """Loads the model and processor once; `caption` is called per batch.

    Inputs are built by the processor's own contract: with a chat template, transformers' own
    `processor.apply_chat_template(..., tokenize=True)` with the image in the message (one image list per prompt,
    BOS exactly as transformers adds it, the template's date pinned to `chat_date`); without one, the prompt laid
    out as the processor expects (`PLAIN_LAYOUTS`). A batch is one `generate` call."""

    def __init__(
        self,
        model: str,
        *,
        revision: str | None = None,
        dtype: str = "auto",
        device: str = "auto",
        max_new_tokens: int = 128,
        batch_size: int = 8,
        trust_remote_code: bool = False,
        chat_date: str | None = None,
        label: str = "captioner",
    ) -> None:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from .batching import Fallbacks
        from .chat import RESEARCH_DATE
        from .ids import resolve_model
        from .loading import fix_padding, pick_device, pick_dtype

        path = resolve_model(model)
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.processor = AutoProcessor.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
        tok = getattr(self.processor, "tokenizer", None)
        if tok is not None:
            fix_padding(tok)
        self.model = (
            AutoModelForImageTextToText.from_pretrained(
                path, revision=revision, dtype=self.dtype, trust_remote_code=trust_remote_code
            )
            .to(self.device)
            .eval()
        )
        if self.model.generation_config.pad_token_id is None and tok is not None:
            self.model.generation_config.pad_token_id = tok.pad_token_id
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.chat_date = chat_date or RESEARCH_DATE
        self.fallbacks = Fallbacks(label)
        self._torch = torch

    @classmethod
    def from_config(cls, c, *, batch_size: int | None = None) -> Captioner:
        """From a captioner config section (`CaptionerConfig` or the service's `ServeCaptionerConfig`)."""
        return cls(
            c.model,
            revision=c.revision,
            dtype=c.dtype,
            max_new_tokens=c.max_new_tokens,
            batch_size=batch_size or getattr(c, "micro_batch", 8),
            trust_remote_code=c.trust_remote_code,
            chat_date=c.chat_date,
        )

    @property
    def templated(self) -> bool:
        """Whether prompts go through the processor's chat template (which writes the special tokens)."""
        return bool(getattr(self.processor, "chat_template", None))

    @staticmethod
    def _messages(prompt: str, image: Any = None) -> list[dict]:
        picture = {"type": "image"} if image is None else {"type": "image", "image": image}
        return [{"role": "user", "content": [picture, {"type": "text", "text": prompt}]}]

    def _template_vars(self) -> dict:
        from .chat import date_vars

        return date_vars(self.processor.chat_template, self.chat_date)

    def render(self, prompt: str) -> str:
        """The text the model is asked, before the processor expands its image tokens."""
        proc = self.processor
        if self.templated:
            return proc.apply_chat_template(self._messages(prompt), add_generation_prompt=True, **self._template_vars())
        layout = PLAIN_LAYOUTS.get(type(proc).__name__, DEFAULT_LAYOUT)
        return layout.format(image=str(getattr(proc, "image_token", "<image>")), prompt=prompt)

    def _inputs(self, images: list[Any], prompts: list[str]) -> dict:
        """The model inputs of a batch, on the device."""
        if self.templated:
            enc = self.processor.apply_chat_template(
                [self._messages(p, im) for im, p in zip(images, prompts)],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
                return_tensors="pt",
                processor_kwargs={"padding": True},
                **self._template_vars(),
            )
        else:
            texts = [self.render(p) for p in prompts]
            enc = self.processor(images=[[im] for im in images], text=texts, padding=True, return_tensors="pt")
        return {
            k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device)) for k, v in enc.items()
        }

    def _generate(self, images: list[Any], prompts: list[str]) -> list[str | None]:
        enc = self._inputs(images, prompts)
        with self._torch.inference_mode():
            out = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False)
        new = out[:, enc["input_ids"].shape[1] :]
        decoded = self.processor.batch_decode(new, skip_special_tokens=True)
        return [clean_caption(t) for t in decoded]

    def caption(self, images: list[Any], prompts: list[str]) -> list[CaptionResult]:
        """Caption `images[i]` with `prompts[i]`; images are PIL images or HxWx3 uint8 arrays."""
        from PIL import Image

        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} image(s) for {len(prompts)} prompt(s)")
        pil = [im if isinstance(im, Image.Image) else Image.fromarray(im) for im in images]
        from .batching import error_text, run_batched

        def run(chunk):
            return [CaptionResult(c) for c in self._generate([im for im, _ in chunk], [p for _, p in chunk])]

        return run_batched(
            list(zip(pil, prompts)),
            self.batch_size,
            run,
            lambda e: CaptionResult(None, error_text(e)),
            sort_key=lambda item: len(item[1]),
            fallbacks=self.fallbacks,
            is_error=lambda r: r.error is not None,
        )
