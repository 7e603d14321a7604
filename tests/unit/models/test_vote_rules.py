"""The two vote rules of caption quality evaluation: `strict` (ours) and `research` (ninglab/CASLIE cqe.py)."""

import itertools

import pytest

from caslie_core.models.judge import VOTE_RULES, keep_caption, plurality, research_ballot, research_winner

OTHER = "not"  # a ballot that is neither yes nor no ("Not really" -> "not")


def _research_rule(ballots) -> bool:
    """The rule as stated, written out independently: most ballots wins, first in judge order on a tie."""
    counts = {}
    for b in ballots:
        counts[b] = counts.get(b, 0) + 1
    top = max(counts.values())
    winner = next(b for b in ballots if counts[b] == top)
    return winner == "yes"


PATTERNS = list(itertools.product(["yes", "no", OTHER], repeat=5))


def test_all_five_judge_patterns_follow_the_research_rule():
    assert len(PATTERNS) == 243
    for p in PATTERNS:
        assert keep_caption("a caption", None, list(p), rule="research") == _research_rule(p), p


def test_strict_and_research_disagree_on_45_of_243_patterns():
    differ = [
        p for p in PATTERNS if keep_caption("c", None, list(p)) != keep_caption("c", None, list(p), rule="research")
    ]
    assert len(differ) == 45
    by_counts = {}
    for p in differ:
        key = (p.count("yes"), p.count("no"), p.count(OTHER))
        by_counts[key] = by_counts.get(key, 0) + 1
    assert by_counts == {
        (2, 2, 1): 15,  # strict: a tie rejects; research: yes wins when it came before no
        (2, 1, 2): 15,  # strict keeps; research: the other ballot ties yes and came first
        (2, 0, 3): 10,  # strict keeps (2 > 0); research: the other ballot wins
        (1, 0, 4): 5,
    }


def test_strict_rule_is_unchanged():
    for p in PATTERNS:
        assert keep_caption("c", None, list(p), rule="strict") == (p.count("yes") > p.count("no"))
        assert keep_caption("c", None, list(p)) == plurality(list(p))
    assert not keep_caption("c", {"kind": "fetch"}, ["yes", "yes"])
    assert not keep_caption(None, None, ["yes"])


def test_research_rule_caption_error_and_failed_judges():
    assert keep_caption("NA", {"kind": "fetch"}, ["yes", "no", "yes"], rule="research")  # the error does not veto
    assert not keep_caption(None, None, ["yes", "yes"], rule="research")
    assert keep_caption("c", None, [None, "no", "yes", None, "yes"], rule="research")  # None: no ballot
    assert not keep_caption("c", None, [None, None], rule="research")
    assert not keep_caption("c", None, [], rule="research")
    assert not keep_caption("c", None, ["", "", "yes"], rule="research")  # an empty reply is a ballot too


def test_research_winner_orders_ties_by_first_appearance():
    assert research_winner(["no", "yes", "yes", "no"]) == "no"
    assert research_winner(["yes", "no", "no", "yes"]) == "yes"
    assert research_winner([None, "the", "yes", "the", "yes"]) == "the"
    assert research_winner(["**y", "not", "no"]) == "**y"
    assert research_winner([None, None]) is None
    assert research_winner([]) is None


def test_unknown_rule_names_the_valid_ones():
    assert VOTE_RULES == ("strict", "research")
    with pytest.raises(ValueError, match="strict, research"):
        keep_caption("c", None, ["yes"], rule="majority")


def _literal(text: str) -> str:
    """The research code's expression, verbatim."""
    return text.replace("\n", " ").strip()[:3].strip().strip(".").strip(",").lower()


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Yes.", "yes"),
        (" yes, it helps", "yes"),
        ("No", "no"),
        ("no.", "no"),
        ("No, it does not", "no"),
        ("no,", "no"),
        ("**Yes**", "**y"),
        ("The caption", "the"),
        ("", ""),
        ("\nyes", "yes"),
        ("YES!", "yes"),
        ("Yes!", "yes"),
        ("Not really", "not"),
        ("N.", "n"),
        ("y.\n", "y"),
        (". yes", " y"),  # the outer spaces go before the dot does: a space is left
        ("\n\nNo\n", "no"),
        ("  ,yes", "ye"),
    ],
)
def test_research_ballot(text, expected):
    assert research_ballot(text) == _literal(text)
    assert research_ballot(text) == expected


def test_research_ballot_of_none_is_empty():
    assert research_ballot(None) == ""
