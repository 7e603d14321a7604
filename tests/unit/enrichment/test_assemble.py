import json

import pytest

from caslie_core.enrichment.assemble import PRP_KEYS, SINGLE_KEY, assemble
from caslie_core.records import parse_record


def rec(task, inp, options=(), n=1):
    return parse_record(
        {
            "task": task,
            "instruction": "x",
            "input": json.dumps(inp),
            "options": json.dumps(list(options)),
            "images": json.dumps(["u"] * n),
        }
    )


def test_single_image_kept_and_rejected():
    r = rec("CC", {"title": "Acme phone"}, ["A: a"])
    assert assemble(r, ["a black phone"], [True]).input == {"title": "Acme phone", SINGLE_KEY: "a black phone"}
    assert assemble(r, ["a black phone"], [False]).input[SINGLE_KEY] is None
    assert assemble(r, [None], [True]).input[SINGLE_KEY] is None  # failed image
    assert r.input == {"title": "Acme phone"}  # the record itself is untouched


def test_prp_one_key_per_product():
    r = rec("PRP", {"product 1": "a", "product 2": "b"}, ["A: x"], n=2)
    out = assemble(r, ["cap1", "cap2"], [False, True]).input
    assert out[PRP_KEYS[0]] is None and out[PRP_KEYS[1]] == "cap2"


def test_sr_appends_kept_captions_to_items_and_options():
    r = rec("SR", ["1st: kite", "2nd: ball"], ["A: robot", "B: doll"], n=4)
    out = assemble(r, ["c0", "c1", "c2", None], [True, False, True, True])
    assert out.input == ["1st: kite c0", "2nd: ball"]
    assert out.options == ["A: robot c2", "B: doll"]


def test_length_mismatch_is_an_error():
    r = rec("CC", {"title": "x"}, ["A: a"])
    with pytest.raises(ValueError, match="1 image"):
        assemble(r, ["a", "b"], [True, True])
