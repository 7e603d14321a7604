"""The research judge preset on the tiny LM: ballots, the system turn, and templates without a system role.
Random weights: the replies are junk, so tests check how a ballot relates to its reply, never strings."""

import shutil

import pytest

from caslie_core.models.judge import RESEARCH_SYSTEM, Judge, research_ballot
from caslie_core.models.loading import chat_text, supports_system

QUESTIONS = [
    f"A model must identify a product's category. Product title: 'Acme phone {i}'. Information extracted "
    f"from the product image: 'a black phone'. Will the information help? Answer only yes or no."
    for i in range(5)
]

# The tiny template with a system role refused, as some model families do (Gemma, older Mistral).
NO_SYSTEM_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _check_ballots(judge, questions=QUESTIONS):
    votes = judge.vote(questions)
    assert len(votes) == len(questions)
    for v in votes:
        assert v.error is None and v.raw is not None
        assert v.vote == research_ballot(v.raw)
        assert v.vote == v.raw.replace("\n", " ").strip()[:3].strip().strip(".").strip(",").lower()
    return votes


@pytest.mark.parametrize("system", [RESEARCH_SYSTEM, None])
def test_research_judge_votes_the_reduced_reply(tiny_models, system):
    judge = Judge("tiny:lm", mode="generate", reply="research", system_message=system, batch_size=4)
    assert judge.max_new_tokens == 16
    assert judge._system == system  # the tiny template has a system role
    _check_ballots(judge)
    text, applied = chat_text(judge.tokenizer, QUESTIONS[0], judge._system)
    assert applied and text.endswith("<|assistant|>\n")
    assert (f"<|system|>\n{RESEARCH_SYSTEM}" in text) == (system is not None)
    assert text.index("<|user|>") == (0 if system is None else len(f"<|system|>\n{RESEARCH_SYSTEM}"))


def test_system_turn_changes_the_prompt_and_strict_reply_is_unchanged(tiny_models):
    strict = Judge("tiny:lm", mode="generate", max_new_tokens=4, batch_size=8)
    with_system = Judge("tiny:lm", mode="generate", max_new_tokens=4, batch_size=8, system_message=RESEARCH_SYSTEM)
    plain, system = strict._encode(QUESTIONS[:2]), with_system._encode(QUESTIONS[:2])
    assert system["input_ids"].shape[1] > plain["input_ids"].shape[1]
    for v in strict.vote(QUESTIONS):
        assert v.vote in ("yes", "no", None)


def test_template_without_a_system_role_skips_the_system_message(tiny_models, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["lm"])
    tok.chat_template = NO_SYSTEM_TEMPLATE
    with pytest.raises(Exception, match="System role not supported"):
        tok.apply_chat_template([{"role": "system", "content": "s"}, {"role": "user", "content": "q"}], tokenize=False)
    assert not supports_system(tok)
    user_only = tok.apply_chat_template([{"role": "user", "content": "q"}], tokenize=False, add_generation_prompt=True)
    assert chat_text(tok, "q", RESEARCH_SYSTEM) == chat_text(tok, "q") == (user_only, True)
    assert user_only.startswith("<|user|>\nq")

    path = tmp_path / "lm-no-system"
    shutil.copytree(tiny_models["lm"], path)
    tok.save_pretrained(path)
    judge = Judge(str(path), mode="generate", reply="research", system_message=RESEARCH_SYSTEM, batch_size=4)
    assert judge.system_message == RESEARCH_SYSTEM and judge._system is None
    _check_ballots(judge, QUESTIONS[:3])


def test_templates_without_system_role_or_none_at_all(tiny_models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["lm"])
    assert supports_system(tok)
    tok.chat_template = "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}"
    assert not supports_system(tok)  # renders, but drops the system turn
    tok.chat_template = None
    assert not supports_system(tok)
    assert chat_text(tok, "q", RESEARCH_SYSTEM) == ("q\nAnswer:", False)


def test_research_reply_needs_generate_mode():
    with pytest.raises(ValueError, match="mode='logits'.*mode='generate'"):
        Judge("tiny:lm", mode="logits", reply="research")
    with pytest.raises(ValueError, match="strict, research"):
        Judge("tiny:lm", mode="generate", reply="loose")


def test_config_carries_reply_and_system_message_to_the_judge(tiny_models):
    from pydantic import ValidationError

    from caslie_core.config.enrich import JudgeConfig
    from caslie_core.config.serve import ServeJudgeConfig

    cfg = JudgeConfig(
        name="a", model="tiny:lm", mode="generate", reply="research", system_message=RESEARCH_SYSTEM, micro_batch=2
    )
    judge = Judge.from_config(cfg)
    assert (judge.reply, judge.system_message, judge._system, judge.batch_size) == (
        "research",
        RESEARCH_SYSTEM,
        RESEARCH_SYSTEM,
        2,
    )
    default = ServeJudgeConfig(name="b", model="tiny:lm")
    assert (default.reply, default.system_message) == ("strict", None)
    with pytest.raises(ValidationError, match="set mode=generate"):
        JudgeConfig(name="c", model="tiny:lm", reply="research")
    with pytest.raises(ValidationError):
        ServeJudgeConfig(name="c", model="tiny:lm", mode="generate", reply="majority")
