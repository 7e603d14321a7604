"""The item in flight: Arrow round trip without JSON, the stage contracts, the judge question template."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from caslie_core.items import (
    ITEM_COLUMNS,
    Contract,
    ContractError,
    ImageSlot,
    Item,
    item_schema,
    items_from_table,
    items_to_table,
)
from caslie_core.prompts import fill_caption, judge_question, judge_template
from caslie_core.records import parse_record
from caslie_core.synthetic import write_catalog


def test_items_round_trip_through_arrow_with_native_columns():
    sr = Item("a", task="sequential_recommendation", instruction="i", input=["1: x", "2: y"], options=["A: p"])
    cc = Item(
        "b",
        task="category_classification",
        instruction="i",
        input={"title": "café", "n": 3, "nested": {"k": [1, 2]}},
        options=["A: x", "B: y"],
        images=[ImageSlot(0, "http://x/1.png", "p", "q", "d1", b"px", "cap", True, {"j": "yes"}, {}, None)],
    )
    bad = Item("c", raw="{nope")
    bad.fail("validate", "malformed", "f.jsonl")
    table = items_to_table([sr, cc, bad], pixels=True)
    assert table.schema.remove(len(ITEM_COLUMNS)) == item_schema() and table.num_rows == 3
    # nothing in flight is a JSON string: the input is a list of (key, value) entries, images are structs
    assert pa.types.is_list(table.schema.field("input").type) and pa.types.is_struct(table.schema.field("error").type)
    back = items_from_table(table)
    assert back[0].input == sr.input and back[1].input == cc.input and back[1].options == cc.options
    slot = back[1].images[0]
    assert (slot.caption, slot.cached, slot.votes, slot.pixels, slot.digest) == ("cap", True, {"j": "yes"}, b"px", "d1")
    assert back[2].status == "failed" and back[2].error == {
        "stage": "validate",
        "message": "malformed",
        "source": "f.jsonl",
    }


def test_a_contract_names_the_missing_and_present_columns():
    c = Contract("caption", reads=("status", "images", "pixels"))
    c.check(pa.table({"status": ["x"], "images": [[]], "pixels": [[]]}))
    with pytest.raises(ContractError, match=r"'caption' reads columns \['pixels'\].*present: \['status', 'images'\]"):
        c.check(pa.table({"status": ["x"], "images": [[]]}))


def test_the_judge_template_is_the_judge_question(tmp_path):
    m = write_catalog(tmp_path, 14, seed=2)
    for line in open(m["jsonl"]):
        rec = parse_record(json.loads(line))
        for i in range(len(rec.images)):
            caption = "a red {mug} with 100% \\ cotton"
            assert fill_caption(judge_template(rec, i), caption) == judge_question(rec, i, caption)


def test_an_engine_error_is_found_in_a_chain_and_in_a_remote_traceback_text():
    from caslie_core.errors import EngineError, find_error

    try:
        try:
            raise EngineError("the captioner failed on every item")
        except EngineError as inner:
            raise RuntimeError("UDF failed") from inner
    except RuntimeError as outer:
        assert str(find_error(outer, EngineError)) == "the captioner failed on every item"
    remote = RuntimeError("Traceback ...\ncaslie_core.errors.EngineError: judge 'a' failed on every item\n\nUDF failed")
    assert str(find_error(remote, EngineError)) == "judge 'a' failed on every item"
    assert find_error(RuntimeError("no such thing"), EngineError) is None
