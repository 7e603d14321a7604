"""Tiny random stand-ins of the real model families, built offline.

Each stand-in uses its family's real config, model, processor and image-processor classes, a byte-level BPE
tokenizer trained here on the project's own prompt texts, the hub checkpoint's special tokens (BOS/EOS/pad, the
image token, the chat-control tokens) and the hub's chat template (`hub/*.jinja`, copied verbatim; sources in
`hub/SOURCES.md`). Weights are random: tests check structure (token ids, batch calls, equality of batched and
single outputs, statuses), never text.

`build_families(root)` writes one folder per family under `root` and returns {name: path}; names not
buildable here (no torchvision for the Qwen processors) map to the reason instead of a path.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

HUB = Path(__file__).parent / "hub"
FAMILY_VERSION = "families-v1"
IMAGE = 28  # small images: every processor below resizes to its own size anyway

# What each stand-in stands for (the folder names of `build_families`).
CAPTIONERS = {
    "mllama": "meta-llama/Llama-3.2-11B-Vision-Instruct",
    "llava15": "llava-hf/llava-1.5-7b-hf",
    "llava_next": "llava-hf/llava-v1.6-mistral-7b-hf",
    "paligemma": "google/paligemma-3b-mix-224",
    "idefics3": "HuggingFaceM4/Idefics3-8B-Llama3",
    "blip2": "Salesforce/blip2-opt-2.7b",
    "qwen2_vl": "Qwen/Qwen2-VL-2B-Instruct",
    "qwen2_5_vl": "Qwen/Qwen2.5-VL-7B-Instruct",
}
JUDGES = {  # "mllama" as a judge: loaded text-only (MllamaForCausalLM), as the paper's panel uses it
    "llama31": "meta-llama/Llama-3.1-8B-Instruct",
    "llama32": "meta-llama/Llama-3.2-3B-Instruct",
    "mllama": "meta-llama/Llama-3.2-11B-Vision-Instruct",
    "mistral_v03": "mistralai/Mistral-7B-Instruct-v0.3",
    "phi35": "microsoft/Phi-3.5-mini-instruct",
}
BASES = {  # LoRA training and the predictor (CASLIE-S, -M, -L)
    "llama32": "meta-llama/Llama-3.2-3B-Instruct",
    "mistral_v03": "mistralai/Mistral-7B-Instruct-v0.3",
    "llama2": "meta-llama/Llama-2-13b-chat-hf",
}


def template(name: str) -> str:
    return (HUB / f"{name}.jinja").read_text()


@dataclass
class Specials:
    """A family's special tokens as the hub tokenizer defines them."""

    bos: str | None
    eos: str
    unk: str | None = None
    pad: str | None = None
    add_bos: bool = True
    extra: list[str] = field(default_factory=list)  # control tokens (chat headers, image tokens, ...)
    named: dict[str, str] = field(default_factory=dict)  # e.g. {"image_token": "<image>"}


LLAMA3 = Specials(
    bos="<|begin_of_text|>",
    eos="<|eot_id|>",
    extra=[
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|python_tag|>",
        "<|finetune_right_pad_id|>",
    ],
)
LLAMA2 = Specials(bos="<s>", eos="</s>", unk="<unk>")
MISTRAL3 = Specials(
    bos="<s>", eos="</s>", unk="<unk>", extra=["[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]"]
)


def _corpus() -> list[str]:
    from caslie_core import prompts
    from caslie_core.synthetic import corpus

    return corpus()[:400] + [
        prompts.CAPTION_GENERAL,
        prompts.JUDGE_SUFFIX,
        prompts.instruction_prompt("instruction", {"input": "x"}, ["A: option"]),
        *prompts._CAPTION_CONTEXT.values(),
        *prompts._JUDGE.values(),
        "You are a helpful AI assistant. Cutting Knowledge Date: December 2023 Today Date: 26 Jul 2024",
        "user assistant system USER ASSISTANT yes no Yes No",
    ]


def train_tokenizer(sp: Specials, chat_template: str | None = None, vocab_size: int = 700):
    """A byte-level BPE with `sp`'s special tokens, BOS added by the post-processor when `sp.add_bos`
    (as the Llama, Mistral, Gemma and OPT tokenizers do), saved-and-reloadable as a fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [t for t in (sp.unk, sp.bos, sp.eos, sp.pad) if t] + sp.extra + list(sp.named.values())
    specials = list(dict.fromkeys(specials))
    tok = Tokenizer(models.BPE(unk_token=sp.unk))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    if sp.add_bos and sp.bos:
        bos_id = tok.token_to_id(sp.bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{sp.bos} $A", pair=f"{sp.bos} $A {sp.bos} $B", special_tokens=[(sp.bos, bos_id)]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=sp.bos,
        eos_token=sp.eos,
        unk_token=sp.unk,
        pad_token=sp.pad,
        extra_special_tokens=dict(sp.named),
        model_max_length=4096,
    )
    if sp.extra:
        fast.add_special_tokens({"additional_special_tokens": sp.extra})
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def _llama_text(tok, cls_name="LlamaConfig", **kw):
    import transformers

    base = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    base.update(kw)
    return getattr(transformers, cls_name)(**base)


def _vision(cls_name: str, **kw):
    """A tiny vision tower config of `cls_name` (CLIP, SigLIP, BLIP-2, Idefics3): 2 layers, 16-pixel images."""
    import transformers

    base = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=8
    )
    return getattr(transformers, cls_name)(**{**base, **kw})


def _save(out: Path, model, tok, processor=None) -> str:
    out.mkdir(parents=True, exist_ok=True)
    if tok.pad_token_id is not None:
        model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    (processor or tok).save_pretrained(out)
    if processor is not None:
        tok.save_pretrained(out)
    return str(out)


# ---- captioners -------------------------------------------------------------------------------------------


def build_mllama(out: Path) -> str:
    """Llama-3.2-11B-Vision-Instruct's architecture (cross-attention image layers, tiled images)."""
    from transformers import (
        MllamaConfig,
        MllamaForConditionalGeneration,
        MllamaImageProcessorPil,
        MllamaProcessor,
        MllamaTextConfig,
        MllamaVisionConfig,
    )

    sp = Specials(**{**LLAMA3.__dict__, "pad": "<|finetune_right_pad_id|>", "named": {"image_token": "<|image|>"}})
    tok = train_tokenizer(sp, template("mllama"))
    vision = MllamaVisionConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_global_layers=1,
        attention_heads=2,
        intermediate_size=64,
        vision_output_dim=64,
        image_size=IMAGE,
        patch_size=14,
        max_num_tiles=2,
        intermediate_layers_indices=[0],
        supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]],
    )
    text = MllamaTextConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        cross_attention_layers=[1],
        bos_token_id=tok.bos_token_id,
        eos_token_id=[tok.eos_token_id, tok.convert_tokens_to_ids("<|end_of_text|>")],
        pad_token_id=tok.pad_token_id,
        max_position_embeddings=4096,
    )
    cfg = MllamaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<|image|>"))
    model = MllamaForConditionalGeneration(cfg)
    ip = MllamaImageProcessorPil(size={"height": IMAGE, "width": IMAGE}, max_image_tiles=2)
    proc = MllamaProcessor(image_processor=ip, tokenizer=tok, chat_template=template("mllama"))
    return _save(out, model, tok, proc)


def build_llava15(out: Path) -> str:
    """llava-hf/llava-1.5-7b-hf: CLIP tower + Llama-2 tokenizer with `<image>`, its USER/ASSISTANT template."""
    from transformers import (
        CLIPImageProcessorPil,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    sp = Specials(**{**LLAMA2.__dict__, "pad": "<pad>", "named": {"image_token": "<image>"}})
    tok = train_tokenizer(sp, template("llava15"))
    vision = _vision("CLIPVisionConfig")
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=_llama_text(tok),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=4,
    )
    model = LlavaForConditionalGeneration(cfg)
    ip = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    proc = LlavaProcessor(
        image_processor=ip,
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=template("llava15"),
    )
    return _save(out, model, tok, proc)


def build_llava_next(out: Path) -> str:
    """llava-hf/llava-v1.6-mistral-7b-hf: any-resolution tiles (image_grid_pinpoints), Mistral text model."""
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    sp = Specials(**{**MISTRAL3.__dict__, "pad": "<unk>", "named": {"image_token": "<image>"}})
    tok = train_tokenizer(sp, template("llava_next_mistral"))
    vision = _vision("CLIPVisionConfig")
    grid = [[16, 32], [32, 16], [32, 32]]
    cfg = LlavaNextConfig(
        vision_config=vision,
        text_config=_llama_text(tok, "MistralConfig", sliding_window=None),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_grid_pinpoints=grid,
        image_seq_length=4,
    )
    model = LlavaNextForConditionalGeneration(cfg)
    ip = LlavaNextImageProcessorPil(
        size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}, image_grid_pinpoints=grid
    )
    proc = LlavaNextProcessor(
        image_processor=ip,
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=template("llava_next_mistral"),
    )
    return _save(out, model, tok, proc)


def build_paligemma(out: Path) -> str:
    """google/paligemma-3b-mix: SigLIP tower + Gemma, no chat template: the processor lays out the prompt."""
    from transformers import (
        GemmaConfig,
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessorPil,
    )

    sp = Specials(bos="<bos>", eos="<eos>", unk="<unk>", pad="<pad>", named={"image_token": "<image>"})
    tok = train_tokenizer(sp)
    vision = _vision("SiglipVisionConfig")
    text = GemmaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=8,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    cfg = PaliGemmaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        projection_dim=32,
        hidden_size=32,
    )
    cfg.vision_config.projection_dim = 32
    model = PaliGemmaForConditionalGeneration(cfg)
    ip = SiglipImageProcessorPil(size={"height": 16, "width": 16})
    ip.image_seq_length = 4
    proc = PaliGemmaProcessor(image_processor=ip, tokenizer=tok)
    return _save(out, model, tok, proc)


def build_idefics3(out: Path) -> str:
    """HuggingFaceM4/Idefics3-8B-Llama3 (and SmolVLM's processor rules): images as one list per prompt,
    `<fake_token_around_image>` blocks, `<end_of_utterance>` turns."""
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
    )

    sp = Specials(
        **{
            **LLAMA3.__dict__,
            "eos": "<|end_of_text|>",
            "pad": "<|reserved_special_token_0|>",
            "extra": [*LLAMA3.extra, "<|eot_id|>", "<fake_token_around_image>", "<end_of_utterance>"],
            "named": {"image_token": "<image>"},
        }
    )
    tok = train_tokenizer(sp, template("idefics3"))
    vision = _vision("Idefics3VisionConfig", patch_size=4)
    cfg = Idefics3Config(
        vision_config=vision,
        text_config=_llama_text(tok),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        scale_factor=2,
        pad_token_id=tok.pad_token_id,
    )
    model = Idefics3ForConditionalGeneration(cfg)
    ip = Idefics3ImageProcessorPil(
        size={"longest_edge": 16}, max_image_size={"longest_edge": 16}, do_image_splitting=False
    )
    proc = Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=4, chat_template=template("idefics3"))
    return _save(out, model, tok, proc)


def build_blip2(out: Path) -> str:
    """Salesforce/blip2-opt-2.7b: Q-Former query tokens that the processor inserts itself; OPT text model."""
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        Blip2QFormerConfig,
        BlipImageProcessorPil,
        OPTConfig,
    )

    # OPT's BOS is `</s>` (id 2), as its tokenizer adds it
    # (the hub tokenizer has `<image>` as an added special token, not as a named `image_token`)
    sp = Specials(bos="</s>", eos="</s>", unk="<unk>", pad="<pad>", extra=["<image>"])
    tok = train_tokenizer(sp)
    vision = _vision("Blip2VisionConfig")
    qformer = Blip2QFormerConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, encoder_hidden_size=32
    )
    text = OPTConfig(
        vocab_size=len(tok),
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=32,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        max_position_embeddings=512,
    )
    cfg = Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=text.to_dict(),
        num_query_tokens=4,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    model = Blip2ForConditionalGeneration(cfg)
    ip = BlipImageProcessorPil(size={"height": 16, "width": 16})
    proc = Blip2Processor(image_processor=ip, tokenizer=tok, num_query_tokens=4)
    return _save(out, model, tok, proc)


def _qwen(out: Path, which: str) -> str:
    """Qwen2-VL / Qwen2.5-VL: their AutoProcessor needs torchvision (the video processor)."""
    import transformers

    prefix = {"qwen2_vl": "Qwen2VL", "qwen2_5_vl": "Qwen2_5_VL"}[which]
    sp = Specials(
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        add_bos=False,
        extra=["<|im_start|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>"],
        named={"image_token": "<|image_pad|>"},
    )
    tok = train_tokenizer(sp, template(which))
    ip = transformers.Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=56 * 56, patch_size=14, merge_size=2)
    vp = transformers.Qwen2VLVideoProcessor()
    proc = getattr(transformers, f"{prefix}Processor")(
        image_processor=ip, tokenizer=tok, video_processor=vp, chat_template=template(which)
    )
    vision = dict(depth=2, hidden_size=32, num_heads=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    if which == "qwen2_vl":
        vision.update(embed_dim=32, mlp_ratio=2)
    else:
        vision.update(intermediate_size=64, out_hidden_size=32, fullatt_block_indexes=[1], window_size=56)
    text = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    cfg = getattr(transformers, f"{prefix}Config")(
        vision_config=vision,
        text_config=text,
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
    )
    model = getattr(transformers, f"{prefix}ForConditionalGeneration")(cfg)
    return _save(out, model, tok, proc)


# ---- judges and training bases ------------------------------------------------------------------------------


def _causal(out: Path, sp: Specials, tmpl: str | None, cls: str = "LlamaForCausalLM", cfg: str = "LlamaConfig", **kw):
    import transformers

    tok = train_tokenizer(sp, tmpl)
    model = getattr(transformers, cls)(_llama_text(tok, cfg, **kw))
    return _save(out, model, tok)


def build_llama31(out: Path) -> str:
    return _causal(out, LLAMA3, template("llama31"))


def build_llama32(out: Path) -> str:
    return _causal(out, LLAMA3, template("llama32"))


def build_mistral_v03(out: Path) -> str:
    return _causal(out, MISTRAL3, template("mistral_v03"), "MistralForCausalLM", "MistralConfig", sliding_window=None)


def build_phi35(out: Path) -> str:
    sp = Specials(
        bos="<s>",
        eos="<|endoftext|>",
        unk="<unk>",
        pad="<|endoftext|>",
        add_bos=False,
        extra=["</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
    )
    return _causal(out, sp, template("phi35"), "Phi3ForCausalLM", "Phi3Config", pad_token_id=None)


def build_llama2(out: Path) -> str:
    return _causal(out, LLAMA2, template("llama2"))


BUILDERS = {
    "mllama": build_mllama,
    "llava15": build_llava15,
    "llava_next": build_llava_next,
    "paligemma": build_paligemma,
    "idefics3": build_idefics3,
    "blip2": build_blip2,
    "qwen2_vl": lambda out: _qwen(out, "qwen2_vl"),
    "qwen2_5_vl": lambda out: _qwen(out, "qwen2_5_vl"),
    "llama31": build_llama31,
    "llama32": build_llama32,
    "mistral_v03": build_mistral_v03,
    "phi35": build_phi35,
    "llama2": build_llama2,
}


def missing_requirement(name: str) -> str | None:
    """Why a family cannot be built here, or None."""
    if name.startswith("qwen"):
        import importlib.util

        if importlib.util.find_spec("torchvision") is None:
            return "Qwen2-VL/Qwen2.5-VL's AutoProcessor needs torchvision (its video processor); not installed here"
    return None


def build_families(root: str | Path, names=None, *, seed: int = 0) -> dict[str, str]:
    """Build the stand-ins once under `root` (a folder per family; reused when its VERSION matches)."""
    import torch

    root = Path(root)
    out: dict[str, str] = {}
    for name in names or BUILDERS:
        why = missing_requirement(name)
        if why:
            out[name] = "skip: " + why
            continue
        folder = root / name
        stamp = folder / "VERSION"
        if not (stamp.exists() and json.loads(stamp.read_text()).get("version") == FAMILY_VERSION):
            torch.manual_seed(seed)
            BUILDERS[name](folder)
            stamp.write_text(json.dumps({"version": FAMILY_VERSION, "built": time.time()}))
        out[name] = str(folder)
    return out
