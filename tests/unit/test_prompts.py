import json

import pytest

from caslie_core import prompts
from caslie_core.models import judge
from caslie_core.records import parse_record


def rec(task, inp, options=(), n_images=1):
    return parse_record(
        {
            "task": task,
            "instruction": "Do the task.",
            "input": json.dumps(inp),
            "options": json.dumps(list(options)),
            "images": json.dumps([f"u{i}" for i in range(n_images)]),
        }
    )


def test_caption_request_quotes_the_records_own_text():
    r = rec("MPC", {"query": "red phone", "product title": "Acme phone"}, ["A: exact"])
    text = prompts.caption_request(r, 0)
    assert text.startswith(prompts.CAPTION_GENERAL) and "red phone" in text and "Acme phone" in text
    assert "question is answerable: Is it big?" in prompts.caption_request(rec("AP", {"question": "Is it big?"}), 0)
    assert "I love it" in prompts.caption_request(rec("SA", {"review": "I love it"}, ["A: pos"]), 0)
    assert "Acme kettle" in prompts.caption_request(rec("CC", {"title": "Acme kettle"}, ["A: x"]), 0)


def test_prp_roles_swap_for_second_image():
    r = rec("PRP", {"product 1": "P-ONE", "product 2": "P-TWO"}, ["A: x", "B: y"], n_images=2)
    first, second = prompts.caption_request(r, 0), prompts.caption_request(r, 1)
    assert first.index("P-ONE") < first.index("P-TWO")
    assert second.index("P-TWO") < second.index("P-ONE")


def test_sr_quotes_title_of_item_in_this_image():
    r = rec("SR", ["1st: Old Kite", "2nd: Old Ball"], ["A: New Robot", "B: New Doll"], n_images=4)
    got = [prompts.caption_request(r, i) for i in range(4)]
    for text, title in zip(got, ["Old Kite", "Old Ball", "New Robot", "New Doll"]):
        assert text.endswith(title) and "1st:" not in text and "A:" not in text
    with pytest.raises(IndexError):
        prompts.caption_request(r, 4)


def test_judge_question_has_context_caption_and_yes_no_instruction():
    r = rec("PRP", {"product 1": "P-ONE", "product 2": "P-TWO"}, ["A: x"], n_images=2)
    q = prompts.judge_question(r, 1, "A CAPTION")
    assert "A CAPTION" in q and "P-ONE" in q and "product 2" in q and q.endswith("Answer only yes or no.")


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Yes", "yes"),
        (" yes, it helps", "yes"),
        ("NO.", "no"),
        ("no", "no"),
        ('"Yes"', "yes"),
        ("Maybe", None),
        ("", None),
        (None, None),
        ("I think yes", None),
    ],
)
def test_parse_judge_answer(text, expected):
    assert judge.parse_judge_answer(text) == expected


def test_plurality_ties_and_invalid_votes():
    assert judge.plurality(["yes", "yes", "no"])
    assert not judge.plurality(["yes", "no"])
    assert judge.plurality(["yes", None, None])
    assert not judge.plurality([None, None])


def test_clean_caption():
    assert prompts.clean_caption("a red\n\tphone  on a table") == "a red phone on a table"
    assert prompts.clean_caption("  \n ") is None and prompts.clean_caption("..") is None
    assert prompts.clean_caption(None) is None


def test_instruction_prompt_styles_and_extraction():
    """The structure in brief; `test_prompts_golden.py` holds the byte-for-byte checks against the research code."""
    alpaca = prompts.instruction_prompt("Pick.", {"title": "x"}, ["A: a", "B: b"])
    assert "### Instruction:\nPick." in alpaca and '### Input:\n{"title": "x"}' in alpaca
    assert '### Options:\n["A: a", "B: b"]' in alpaca and alpaca.endswith("### Response:\n")
    assert "### Options:\n[]" in prompts.instruction_prompt("Pick.", '{"q": 1}', "[]")  # as the research code
    assert "### Options" not in prompts.instruction_prompt("Pick.", '{"q": 1}', None)
    mistral = prompts.instruction_prompt("Pick.", {"title": "x"}, [], style="mistral")
    assert mistral.startswith("[INST] ") and mistral.endswith("\n\n [/INST] ### Response:\n")
    assert prompts.extract_response(" B\n") == "B"
    assert prompts.extract_response(alpaca + " B\n", prompt=alpaca) == "B"
    assert prompts.extract_response(" yes [/INST] ### Response: no", "mistral") == "yes"
    with pytest.raises(ValueError, match="alpaca, mistral"):
        prompts.instruction_prompt("x", {}, [], style="chatml")
    assert prompts.default_style_for("mistralai/Mistral-7B-Instruct-v0.3") == "mistral"
    assert prompts.default_style_for("meta-llama/Llama-3.2-3B-Instruct") == "alpaca"
