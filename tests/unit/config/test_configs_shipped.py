"""Every shipped config validates, and starts with the command that runs it."""

from pathlib import Path

import pytest
from helpers import ROOT

from caslie_core.config import config_model_for, load_config

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert {p.name for p in CONFIGS} >= {
        "enrich-demo.yaml",
        "enrich-mmecinstruct.yaml",
        "train-demo.yaml",
        "train-caslie-s.yaml",
        "evaluate-demo.yaml",
        "evaluate-caslie-m.yaml",
    }


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_validates_and_names_its_command(path: Path):
    model = config_model_for(str(path))
    cfg = load_config(model, path)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and ("caslie " in first or "python -m" in first or "serve " in first)
    assert cfg.model_dump()


JOB_CONFIGS = [p for p in CONFIGS if p.name.split("-", 1)[0] in ("enrich", "train", "evaluate")]


@pytest.mark.parametrize("path", JOB_CONFIGS, ids=[p.name for p in JOB_CONFIGS])
def test_every_job_config_has_input_path_and_output_path(path: Path):
    """The stable interface: `caslie JOB CONFIG --set input.path=X --set output.path=Y` for every shipped config."""
    model = config_model_for(str(path))
    cfg = load_config(model, path, ["input.path=s3://b/in", "output.path=s3://b/out"])
    assert cfg.input.path == "s3://b/in" and cfg.output.path == "s3://b/out"
    assert "input.path" in path.read_text().splitlines()[0] or path.name.endswith("-demo.yaml")


def test_paper_config_matches_the_method():
    from caslie_core.config import EnrichConfig

    cfg = load_config(EnrichConfig, ROOT / "configs" / "enrich-mmecinstruct.yaml")
    assert cfg.captioner.model == "meta-llama/Llama-3.2-11B-Vision-Instruct"
    assert cfg.captioner.max_new_tokens == 128 and cfg.captioner.pool.num_gpus >= 1
    assert {j.model for j in cfg.judges} == {
        "meta-llama/Llama-3.2-3B-Instruct",
        "meta-llama/Llama-3.1-8B-Instruct",
        "meta-llama/Llama-3.2-11B-Vision-Instruct",
        "mistralai/Mistral-7B-Instruct-v0.3",
        "microsoft/Phi-3.5-mini-instruct",
    }


def test_enrich_config_errors_are_all_reported():
    from caslie_core.config import EnrichConfig
    from caslie_core.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        load_config(
            EnrichConfig,
            ROOT / "configs" / "enrich-demo.yaml",
            [
                "captioner.pool.min_size=3",
                "captioner.pool.max_size=2",
                "judges.0.mode=vote",
                "fetch.threds=4",
                "judges.1.name=judge_logits",
            ],
        )
    text = str(e.value)
    assert "min_size (3) must be <= max_size (2)" in text
    assert "judges.0.mode" in text and "fetch.threds: unknown key" in text


@pytest.mark.parametrize(
    "size,model,arch",
    [
        ("s", "meta-llama/Llama-3.2-3B-Instruct", "llama"),
        ("m", "mistralai/Mistral-7B-Instruct-v0.3", "mistral"),
        ("l", "meta-llama/Llama-2-13b-chat-hf", "llama"),
    ],
)
def test_paper_train_configs_match_the_method_and_their_architectures(size, model, arch):
    """The three CASLIE bases: method LoRA settings, effective batch 128, targets that exist in the architecture
    (checked on a meta-device skeleton of the same architecture family; no download)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

    from caslie_core.config import TrainConfig
    from caslie_core.training.lora import lora_target_problems

    cfg = load_config(TrainConfig, ROOT / "configs" / f"train-caslie-{size}.yaml")
    assert cfg.model.model == model and cfg.scaling.use_gpu and cfg.model.dtype == "bfloat16"
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (16, 16, 0.1)
    assert cfg.optim.lr == 1e-4 and cfg.optim.warmup_ratio == 0.05 and cfg.data.max_length == 2048
    assert cfg.optim.batch_size * cfg.optim.grad_accum * cfg.scaling.num_workers == 128
    assert cfg.model.prompt_style == ("mistral" if arch == "mistral" else "alpaca")
    if size == "l":
        assert cfg.scaling.strategy == "fsdp" and cfg.model.gradient_checkpointing
    small = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
    )
    conf = MistralConfig(**small) if arch == "mistral" else LlamaConfig(**small)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(conf)
    assert lora_target_problems(skeleton, cfg.lora.target_modules) == []


@pytest.mark.parametrize("size", ["s", "m", "l"])
def test_paper_evaluate_configs_use_the_method_decoding(size):
    from caslie_core.config import EvaluateConfig

    cfg = load_config(EvaluateConfig, ROOT / "configs" / f"evaluate-caslie-{size}.yaml")
    assert cfg.generation.max_new_tokens == 100 and cfg.pool.num_gpus >= 1
    assert cfg.model.path.endswith(f"caslie-{size}") and cfg.ablations == ["kept", "none", "all"]
    assert cfg.data.splits == ["test", "ood_test"]


def test_the_research_cqe_preset_sets_the_judges_and_refuses_conflicts():
    from caslie_core.config import EnrichConfig, load_config
    from caslie_core.errors import ConfigError
    from caslie_core.models.judge import RESEARCH_SYSTEM

    paper = load_config(EnrichConfig, ROOT / "configs" / "enrich-mmecinstruct.yaml", [])
    assert paper.cqe.vote == "research"
    assert [(j.mode, j.reply, j.max_new_tokens) for j in paper.judges] == [("generate", "research", 16)] * 5
    # the research code asks the vision judge without a system message; the config keeps that
    assert [j.system_message for j in paper.judges] == [RESEARCH_SYSTEM] * 2 + [None] + [RESEARCH_SYSTEM] * 2
    demo = ROOT / "configs" / "enrich-demo.yaml"  # its judges pin logits and 4 new tokens
    with pytest.raises(ConfigError) as e:
        load_config(EnrichConfig, demo, ["cqe.vote=research"])
    text = str(e.value)
    assert "judges.0.mode='logits'" in text and "judges.1.max_new_tokens=4" in text and "cqe.vote=strict" in text
    with pytest.raises(ConfigError, match="captioner.model is required"):
        load_config(EnrichConfig, demo, ["captioner.model=null"])
    released = load_config(EnrichConfig, ROOT / "configs" / "enrich-mmecinstruct-released.yaml", [])
    assert released.captioner.source == "record" and released.captioner.model is None


def test_the_serve_config_takes_the_same_cqe_rule_and_preset():
    """`cqe.vote` in the Serve config: the service keeps captions by the batch job's rule (research: every judge
    as the research code ran it; a judge pinned otherwise fails the config, naming it)."""
    from caslie_core.config import ServeConfig, load_config
    from caslie_core.errors import ConfigError

    demo = ROOT / "configs" / "serve-demo.yaml"
    assert load_config(ServeConfig, demo, []).cqe.vote == "strict"
    research = load_config(
        ServeConfig, demo, ["cqe.vote=research", "judges.0.mode=generate", "judges.1.max_new_tokens=16"]
    )
    assert [(j.mode, j.reply, j.max_new_tokens) for j in research.judges] == [("generate", "research", 16)] * 2
    with pytest.raises(ConfigError, match=r"cqe.vote=research conflicts with judges.0.mode='logits'"):
        load_config(ServeConfig, demo, ["cqe.vote=research"])


def test_the_qwen_config_is_the_paper_config_with_qwen25_vl_captioning():
    """configs/enrich-mmecinstruct-qwen.yaml: the same panel, CQE, pools and limits as the paper's config; only the
    captioner (Qwen2.5-VL-7B-Instruct, whose processor the cluster image can load: torchvision pinned) and the
    image size (a multiple of its 28-pixel patch grid) differ."""
    from caslie_core.config import EnrichConfig

    paper = load_config(EnrichConfig, ROOT / "configs" / "enrich-mmecinstruct.yaml", [])
    qwen = load_config(EnrichConfig, ROOT / "configs" / "enrich-mmecinstruct-qwen.yaml", [])
    assert qwen.captioner.model == "Qwen/Qwen2.5-VL-7B-Instruct" and qwen.decode.image_size % 28 == 0
    a, b = paper.model_dump(), qwen.model_dump()
    assert a["captioner"].pop("model") != b["captioner"].pop("model")
    assert a["decode"].pop("image_size") != b["decode"].pop("image_size")
    assert a == b
    assert "torchvision==" in (ROOT / "cluster" / "constraints-cu128.txt").read_text()


def test_the_vllm_config_is_the_paper_panel_on_openai_compatible_servers():
    """configs/enrich-mmecinstruct-vllm.yaml: the paper's captioner and judges (same models, same order, same CQE)
    on OpenAI-compatible servers; its pools are CPU actors (a GPU there would hold nothing)."""
    from caslie_core.config import EnrichConfig

    paper = load_config(EnrichConfig, ROOT / "configs" / "enrich-mmecinstruct.yaml", [])
    vllm = load_config(EnrichConfig, ROOT / "configs" / "enrich-mmecinstruct-vllm.yaml", [])
    assert vllm.captioner.model == paper.captioner.model and vllm.captioner.engine == "openai"
    assert [(j.name, j.model, j.mode, j.system_message) for j in vllm.judges] == [
        (j.name, j.model, j.mode, j.system_message) for j in paper.judges
    ]
    assert vllm.cqe == paper.cqe and vllm.captioner.max_new_tokens == paper.captioner.max_new_tokens
    assert all(s.engine == "openai" and s.pool.num_gpus == 0 for s in [vllm.captioner, *vllm.judges])
    assert all(s.openai.api_key_env and s.openai.base_url for s in [vllm.captioner, *vllm.judges])
