import json

import pytest
from sklearn.metrics import accuracy_score, f1_score

from caslie_core.evaluation.metrics import load_predictions, parse_prediction, score_records, score_task
from caslie_core.records import parse_record


def research(task, labels, preds):
    """The research evaluation's semantics, restated as the oracle."""
    valid = set(labels)
    fl, fp, skipped = [], [], 0
    for lab, p in zip(labels, preds):
        p = p.strip()
        if ":" in p:
            p = p[0]
        if p in valid:
            fl.append(lab)
            fp.append(p)
        else:
            skipped += 1
    if task in ("AP", "PSI"):
        return f1_score(fl, fp, pos_label="yes"), skipped
    if task in ("PRP", "SA"):
        return f1_score(fl, fp, average="macro"), skipped
    return accuracy_score(fl, fp), skipped


def test_parse_prediction_like_the_research_code():
    assert parse_prediction(" B: some option ", "ABC") == "B"
    assert parse_prediction("B", "ABC") == "B"
    assert parse_prediction("yes", {"yes", "no"}) == "yes"
    assert parse_prediction("Yes", {"yes", "no"}) is None
    assert parse_prediction("", "ABC") is None
    assert parse_prediction("B\nbecause", "ABC") is None  # multi-line answer
    assert parse_prediction("Electronics", "ABC") is None  # option text instead of its letter
    assert parse_prediction(None, "ABC") is None


CASES = {
    "AP": (["yes", "yes", "no", "no", "yes"], ["yes", "no", "no", "maybe", "yes: sure"]),
    "PSI": (["no", "no", "yes", "yes"], ["yes", "no", "yes", ""]),
    "CC": (["A", "B", "C", "A"], ["A", "B: Kitchen", "D", "Electronics"]),
    "SR": (["A", "C", "B"], ["A", "C", "C"]),
    "MPC": (["A", "B", "C", "D", "A"], ["A", "B", "D", "D", "B"]),
    "PRP": (["A", "B", "C", "A", "B"], ["A", "B", "B", "C", "x"]),
    "SA": (["A", "B", "C", "C"], ["A", "A", "C", "C"]),
}


@pytest.mark.parametrize("task", list(CASES))
def test_research_figure_matches_research_semantics(task):
    labels, preds = CASES[task]
    expected, skipped = research(task, labels, preds)
    got = score_task(task, labels, preds)
    assert got.score == pytest.approx(expected, abs=1e-6)
    assert got.invalid == skipped and got.n == len(labels)


def test_hand_checked_figures():
    # AP: "maybe" is invalid and "yes: sure" parses to "y" (first character), also invalid.
    # Valid pairs (yes,yes) (yes,no) (no,no): tp=1 fp=0 fn=1 -> F1 = 2/3.
    ap = score_task("AP", *CASES["AP"])
    assert ap.score == pytest.approx(2 / 3, abs=1e-6) and ap.invalid == 2
    # strict: invalid counts as wrong: tp=1 fn=2 -> F1 = 0.5; accuracy 2/5.
    assert ap.strict_score == pytest.approx(0.5)
    assert ap.companions["strict_accuracy"] == pytest.approx(0.4)
    # CC: "D" is not a gold label in this set and "Electronics" is not a letter: 2 invalid, 2/2 right.
    cc = score_task("CC", *CASES["CC"])
    assert cc.score == 1.0 and cc.invalid == 2 and cc.strict_score == pytest.approx(0.5)
    # PRP macro-F1 over valid pairs (A,A) (B,B) (C,B) (A,C): per-class F1 A=2/3, B=2/3, C=0 -> 4/9.
    prp = score_task("PRP", *CASES["PRP"])
    assert prp.score == pytest.approx(4 / 9) and prp.invalid == 1
    assert prp.primary == "M-F1" and cc.primary == "R@1" and ap.primary == "F1"


def test_all_invalid_gives_no_research_figure():
    s = score_task("SA", ["A", "B"], ["?", ""])
    assert s.score is None and s.strict_score == 0.0 and s.invalid == 2


def test_misaligned_lengths_fail_clearly():
    with pytest.raises(ValueError, match="align"):
        score_task("CC", ["A", "B"], ["A"])


def _records():
    rows = [
        {
            "id": "r1",
            "task": "CC",
            "instruction": "x",
            "input": {"title": "t"},
            "options": ["A: a", "B: b"],
            "output": "A",
            "images": ["u"],
            "split": "test",
        },
        {
            "id": "r2",
            "task": "CC",
            "instruction": "x",
            "input": {"title": "t2"},
            "options": ["A: a", "B: b"],
            "output": "B",
            "images": ["u"],
            "split": "test",
        },
        {
            "id": "r3",
            "task": "AP",
            "instruction": "x",
            "input": {"question": "q"},
            "options": [],
            "output": "yes",
            "images": ["u"],
            "split": "test",
        },
    ]
    return [parse_record(r) for r in rows]


def test_score_records_groups_by_task():
    out = score_records(_records(), ["A", "A", "yes"])
    assert list(out) == ["AP", "CC"]
    assert out["CC"]["score"] == 0.5 and out["AP"]["score"] == 1.0


def test_load_predictions_list_and_jsonl(tmp_path):
    recs = _records()
    p = tmp_path / "p.json"
    p.write_text(json.dumps(["A", "B", "no"]))
    assert load_predictions(str(p), recs) == ["A", "B", "no"]
    j = tmp_path / "p.jsonl"
    j.write_text('{"id": "r3", "prediction": "yes"}\n{"id": "r1", "prediction": "B"}\n')
    assert load_predictions(str(j), recs) == ["B", None, "yes"]
    p.write_text(json.dumps(["A"]))
    with pytest.raises(ValueError, match="align by position"):
        load_predictions(str(p), recs)
    j.write_text('{"id": "zz", "prediction": "A"}\n')
    with pytest.raises(ValueError, match="match no record"):
        load_predictions(str(j), recs)
