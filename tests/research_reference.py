"""The released research code's prompt rendering and CQE vote, transcribed for tests (independent of caslie_core).

Source: github.com/ninglab/CASLIE at ac1771966a4d20b3361456a9aaefaef6c1e046e0: templates/alpaca.json,
templates/mistral.json, utils/prompter.py (`generate_prompt`, `get_response`), load_data.py (caption insertion),
cqe.py (reply reduction, `Counter.most_common` vote).
"""

from __future__ import annotations

import json
from collections import Counter

P = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
TEMPLATES = {  # the two JSON template files, verbatim
    "alpaca": {
        "prompt_input": P + "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Options:\n{options}"
        "\n\n### Response:\n",
        "prompt_no_options": P + "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        "response_split": "### Response:",
    },
    "mistral": {
        "prompt_input": "[INST] " + P + "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Options:\n"
        "{options}\n\n [/INST] ### Response:\n",
        "prompt_no_options": "[INST] " + P + "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n [/INST] "
        "### Response:\n",
        "response_split": "[/INST] ### Response:",
    },
}


def research_prompt(entry: dict, caption: list, vote: list, template: str) -> str:
    """load_data.py's caption insertion, then Prompter.generate_prompt."""
    ops = json.loads(entry["options"])
    inp = json.loads(entry["input"])
    if entry["task"] == "sequential_recommendation":
        for j in range(len(inp)):
            inp[j] = inp[j] + " " + caption[j] if vote[j] == "yes" else inp[j]
        for j in range(len(ops)):
            ops[j] = ops[j] + " " + caption[j + len(inp)] if vote[j + len(inp)] == "yes" else ops[j]
    elif entry["task"] == "product_relation_prediction":
        inp["product 1 information extracted from image"] = caption[0] if vote[0] == "yes" else None
        inp["product 2 information extracted from image"] = caption[1] if vote[1] == "yes" else None
    else:
        inp["product information extracted from image"] = caption[0] if vote[0] == "yes" else None
    t = TEMPLATES[template]
    options = json.dumps(ops)
    if options:
        return t["prompt_input"].format(instruction=entry["instruction"], input=json.dumps(inp), options=options)
    return t["prompt_no_options"].format(instruction=entry["instruction"], input=json.dumps(inp))


def research_response(output: str, template: str) -> str:
    return output.split(TEMPLATES[template]["response_split"])[1].strip()


def research_ballot(text: str) -> str:
    """cqe.py: the reply reduced to a ballot."""
    return text.replace("\n", " ").strip()[:3].strip().strip(".").strip(",").lower()


def research_vote(ballots: list[str]) -> str:
    """cqe.py: the most common ballot in the judges' order."""
    return Counter(ballots).most_common(1)[0][0]
