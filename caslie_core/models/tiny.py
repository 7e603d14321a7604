"""Tiny models built fully offline, for tests and the demo.

`build_tiny_models(dir)` writes three folders that load exactly like hub models:
- `tokenizer/`: a byte-level BPE trained locally on the synthetic vocabulary and our prompt texts;
- `captioner/`: a LLaVA-architecture image-text-to-text model (tiny CLIP vision tower + tiny Llama),
  with its processor (`AutoProcessor`);
- `lm/`: a tiny `LlamaForCausalLM` with the same tokenizer (judge and predictor base).

Weights are random: their text is junk, so tests check structure, never strings. A model id of the
form `tiny:captioner` / `tiny:lm` in a config resolves to these folders, built on first use and cached
(`CASLIE_CACHE`, default `~/.cache/caslie`). `tiny:world-captioner` / `tiny:world-judge` are trained ones
(`caslie_core.world.models`), for the demo's world, where what the models say must be right.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

TINY_VERSION = "tiny-v1"
TINY_PREFIX = "tiny:"
TINY_NAMES = ("captioner", "lm", "tokenizer")
IMAGE_SIZE = 32
PATCH_SIZE = 8
IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def cache_dir() -> Path:
    return Path(os.environ.get("CASLIE_CACHE", Path.home() / ".cache" / "caslie")).expanduser()


def _train_tokenizer(vocab_size: int = 1024):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from .. import prompts
    from ..synthetic import corpus

    texts = corpus() + [
        prompts.CAPTION_GENERAL,
        prompts.JUDGE_SUFFIX,
        prompts.instruction_prompt("instruction", {"input": "x"}, ["A: option"]),
        *prompts._CAPTION_CONTEXT.values(),
        *prompts._JUDGE.values(),
        "product information extracted from image yes no",
    ]
    specials = ["<unk>", "<s>", "</s>", PAD_TOKEN, IMAGE_TOKEN, "<|user|>", "<|assistant|>", "<|system|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token=PAD_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
        model_max_length=1024,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _text_config(tok, seed_layers: int = 2):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=seed_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )


def build_tiny_models(out_dir: str | Path, *, seed: int = 0) -> dict[str, str]:
    """Build tokenizer, captioner and LM under `out_dir` (about a second); return their paths."""
    import torch
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaForCausalLM,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tok = _train_tokenizer()
    tok.save_pretrained(out / "tokenizer")

    lm = LlamaForCausalLM(_text_config(tok))
    lm.generation_config.pad_token_id = tok.pad_token_id
    lm.save_pretrained(out / "lm")
    tok.save_pretrained(out / "lm")

    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=32,
    )
    n_tokens = (IMAGE_SIZE // PATCH_SIZE) ** 2
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=_text_config(tok),
        image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_seq_length=n_tokens,
        pad_token_id=tok.pad_token_id,
    )
    captioner = LlavaForConditionalGeneration(cfg)
    captioner.generation_config.pad_token_id = tok.pad_token_id
    captioner.save_pretrained(out / "captioner")
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out / "captioner")
    (out / "VERSION").write_text(json.dumps({"version": TINY_VERSION, "seed": seed, "built": time.time()}))
    return {name: str(out / name) for name in TINY_NAMES}


def build_once(root: Path, build) -> None:
    """`build(folder)` into a temporary sibling, then renamed to `root` unless it exists (safe when several
    processes race: the loser's folder is dropped, the winner's is complete). No-op when `root/VERSION` exists."""
    if (root / "VERSION").exists():
        return
    root.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(root.parent / f".{root.name}.lock"):  # the others wait for one build instead of racing
        if not (root / "VERSION").exists():
            _build_into(root, build)


@contextlib.contextmanager
def _build_lock(path: Path):
    try:
        import fcntl
    except ImportError:  # no flock here: racing builds are still safe, only slower
        yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build_into(root: Path, build) -> None:
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    build(tmp)
    if not root.exists():
        try:
            os.replace(tmp, root)
        except OSError:
            pass  # another process won the race; its folder is complete
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def ensure_tiny_models(root: str | Path | None = None) -> dict[str, str]:
    """Build the tiny models once per cache folder (safe when several processes race)."""
    root = Path(root) if root else cache_dir() / TINY_VERSION
    build_once(root, build_tiny_models)
    return {name: str(root / name) for name in TINY_NAMES}
