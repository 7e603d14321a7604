"""The seven MMECInstruct tasks: names, image layout, label space and primary metric."""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Literal

ImageLayout = Literal["single", "pair", "sequence"]
LabelKind = Literal["yes_no", "option_letter"]
Metric = Literal["f1", "macro_f1", "accuracy", "recall_at_1"]

YES_NO = ("yes", "no")
OPTION_LETTERS = tuple(string.ascii_uppercase)


@dataclass(frozen=True)
class Task:
    """One MMECInstruct task.

    `layout` says how images map to the record: `single` (one product image), `pair` (PRP: one
    image per product) or `sequence` (SR: one per history item, then one per option).
    """

    abbr: str
    name: str
    layout: ImageLayout
    label_kind: LabelKind
    primary_metric: Metric
    input_keys: tuple[str, ...]  # required keys of the input object (SR's input is a list)
    has_ood: bool
    description: str

    def expected_images(self, input_value: object, options: list) -> int:
        """Number of images a record of this task must carry."""
        if self.layout == "single":
            return 1
        if self.layout == "pair":
            return 2
        assert isinstance(input_value, list)
        return len(input_value) + len(options)

    def labels(self, options: list | None = None) -> tuple[str, ...]:
        """The valid answers for a record with these options."""
        if self.label_kind == "yes_no":
            return YES_NO
        n = len(options or [])
        return OPTION_LETTERS[:n]

    @property
    def metric_label(self) -> str:
        return {"f1": "F1", "macro_f1": "M-F1", "accuracy": "Acc", "recall_at_1": "R@1"}[self.primary_metric]


TASKS: dict[str, Task] = {
    t.abbr: t
    for t in (
        Task(
            "AP",
            "answerability_prediction",
            "single",
            "yes_no",
            "f1",
            ("question",),
            True,
            "Is the product question answerable from the product's information?",
        ),
        Task(
            "CC",
            "category_classification",
            "single",
            "option_letter",
            "recall_at_1",
            ("title",),
            True,
            "Which fine-grained category does the product belong to?",
        ),
        Task(
            "PRP",
            "product_relation_prediction",
            "pair",
            "option_letter",
            "macro_f1",
            ("product 1", "product 2"),
            True,
            "How are two products related (similar, bought together, viewed together)?",
        ),
        Task(
            "PSI",
            "product_substitute_identification",
            "single",
            "yes_no",
            "f1",
            ("query", "product title"),
            False,
            "Can the product serve as a functional substitute for the query?",
        ),
        Task(
            "MPC",
            "multiclass_product_classification",
            "single",
            "option_letter",
            "accuracy",
            ("query", "product title"),
            False,
            "How relevant is the product to the query?",
        ),
        Task(
            "SA",
            "sentiment_analysis",
            "single",
            "option_letter",
            "macro_f1",
            ("review",),
            True,
            "What is the sentiment of the review?",
        ),
        Task(
            "SR",
            "sequential_recommendation",
            "sequence",
            "option_letter",
            "recall_at_1",
            (),
            True,
            "Which candidate will the user buy next, given the purchase history?",
        ),
    )
}

_BY_NAME = {t.name: t for t in TASKS.values()}
_ALIASES = {"ori_psi": "PSI"}  # the research code's name for PSI


def get_task(name: str) -> Task:
    """Look a task up by abbreviation (`CC`, `cc`) or full name (`category_classification`)."""
    if not isinstance(name, str) or not name.strip():
        raise KeyError(f"task must be a non-empty string, got {name!r}")
    key = name.strip()
    if key.upper() in TASKS:
        return TASKS[key.upper()]
    low = key.lower()
    if low in _BY_NAME:
        return _BY_NAME[low]
    if low in _ALIASES:
        return TASKS[_ALIASES[low]]
    valid = ", ".join(f"{t.abbr} ({t.name})" for t in TASKS.values())
    raise KeyError(f"unknown task {name!r}; valid tasks: {valid}")


def task_names() -> list[str]:
    return [t.name for t in TASKS.values()]


def wanted_tasks(tasks: list[str] | None) -> list[str] | None:
    """The names of the tasks a config asks for (abbreviations accepted), None for all; KeyError names
    an unknown one."""
    return [get_task(t).name for t in tasks] if tasks else None
