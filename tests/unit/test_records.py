import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from caslie_core.errors import RecordError, SourceError
from caslie_core.io.sources import iter_records, load_records
from caslie_core.records import Record, Reject, normalise_split, parse_record


def cc_row(**kw):
    row = {
        "task": "category_classification",
        "split": "train",
        "instruction": "Choose the category.",
        "input": json.dumps({"title": "Acme red phone"}),
        "options": json.dumps(["A: Electronics", "B: Kitchen"]),
        "output": "A",
        "images": json.dumps(["http://x/1.png"]),
    }
    row.update(kw)
    return row


def sr_row(**kw):
    row = {
        "task": "sequential_recommendation",
        "split": "test",
        "instruction": "Recommend.",
        "input": json.dumps(["1st: Acme phone", "2nd: Nova mug"]),
        "options": json.dumps(["A: kite", "B: ball", "C: robot"]),
        "output": "B",
        "images": json.dumps([f"http://x/{i}.png" for i in range(5)]),
    }
    row.update(kw)
    return row


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_parse_json_strings_and_structured_values_give_same_record():
    a = parse_record(cc_row())
    b = parse_record(
        cc_row(input={"title": "Acme red phone"}, options=["A: Electronics", "B: Kitchen"], images=["http://x/1.png"])
    )
    assert a.id == b.id and len(a.id) == 16
    assert a.input == {"title": "Acme red phone"} and a.options == ["A: Electronics", "B: Kitchen"]
    assert a.labels == ("A", "B")


def test_given_id_is_kept_and_extra_fields_travel():
    rec = parse_record(cc_row(id=42, caption_info=json.dumps(["a caption"])))
    assert rec.id == "42"
    assert rec.extra == {"caption_info": json.dumps(["a caption"])}


def test_sr_layout_history_plus_options():
    rec = parse_record(sr_row())
    assert rec.spec.abbr == "SR" and len(rec.images) == 5


@pytest.mark.parametrize(
    "value,expected",
    [
        ("train", "train"),
        ("validation", "val"),
        ("VAL", "val"),
        ("test", "test"),
        ("OOD", "ood_test"),
        ("test_ood", "ood_test"),
        ("ood-test", "ood_test"),
        (None, None),
    ],
)
def test_split_variants(value, expected):
    assert normalise_split(value) == expected


@pytest.mark.parametrize(
    "change,field,fragment",
    [
        ({"task": "color_guessing"}, "task", "unknown task"),
        ({"task": None}, "task", "missing"),
        ({"input": "{not json"}, "input", "malformed JSON"),
        ({"input": json.dumps({"name": "x"})}, "input", "missing key(s) ['title']"),
        ({"input": json.dumps(["a"])}, "input", "expected a JSON dict"),
        ({"options": "[1, 2]"}, "options", "list of strings"),
        ({"options": "[]"}, "options", "no options"),
        ({"images": json.dumps(["a", "b"])}, "images", "expected 1 image"),
        ({"images": "not json"}, "images", "malformed JSON"),
        ({"output": "Z"}, "output", "not a valid label"),
        ({"split": "holdout"}, "split", "unknown split"),
        ({"instruction": ""}, "instruction", "non-empty string"),
    ],
)
def test_bad_record_names_field_and_reason(change, field, fragment):
    with pytest.raises(RecordError) as e:
        parse_record(cc_row(**change), source="f.jsonl", row=7)
    err = e.value
    assert err.field == field and fragment in err.reason
    assert "f.jsonl" in str(err) and "row 7" in str(err) and err.record_id


def test_wrong_image_count_for_sr_and_prp():
    with pytest.raises(RecordError, match="5 images"):
        parse_record(sr_row(images=json.dumps(["a"] * 4)))
    prp = {
        "task": "PRP",
        "instruction": "x",
        "input": {"product 1": "a", "product 2": "b"},
        "options": ["A: x", "B: y", "C: z"],
        "images": ["i1"],
    }
    with pytest.raises(RecordError, match="2 images"):
        parse_record(prp)


def test_unlabelled_record_is_valid():
    rec = parse_record(cc_row(output=None, split=None))
    assert rec.output is None and rec.split is None


def test_same_records_same_ids_across_jsonl_json_parquet(tmp_path):
    rows = [cc_row(), sr_row()]
    jl = write_jsonl(tmp_path / "r.jsonl", rows)
    js = tmp_path / "r.json"
    js.write_text(json.dumps(rows, indent=1))
    pqp = tmp_path / "r.parquet"
    pq.write_table(pa.Table.from_pylist(rows), pqp)
    gz = tmp_path / "r.jsonl.gz"
    gz.write_bytes(gzip.compress(open(jl, "rb").read()))
    ids = [[r.id for r in load_records(str(p)).records] for p in (jl, js, pqp, gz)]
    assert ids[0] == ids[1] == ids[2] == ids[3] and len(set(ids[0])) == 2


def test_json_array_streams_in_small_chunks(tmp_path):
    from caslie_core.io.sources import _iter_json_array

    rows = [cc_row(id=i) for i in range(30)]
    p = tmp_path / "big.json"
    p.write_text(json.dumps(rows))
    with open(p) as fh:
        got = list(_iter_json_array(str(p), fh, chunk_size=37))
    assert [r["id"] for _, r in got] == list(range(30))


def test_collect_mode_accounts_for_every_row(tmp_path):
    p = tmp_path / "mixed.jsonl"
    lines = [
        json.dumps(cc_row(id="ok1")),
        "{broken json",
        json.dumps(cc_row(id="bad", task="nope")),
        json.dumps(cc_row(id="ok1")),
        json.dumps(sr_row(id="ok2")),
    ]
    p.write_text("\n".join(lines) + "\n")
    items = list(iter_records(str(p), mode="collect"))
    assert len(items) == 5
    kinds = [type(i).__name__ for i in items]
    assert kinds == ["Record", "Reject", "Reject", "Reject", "Record"]
    rejects = [i for i in items if isinstance(i, Reject)]
    assert rejects[0].row == 2 and "malformed JSON" in rejects[0].reason
    assert rejects[1].id == "bad" and rejects[1].field == "task"
    assert rejects[2].field == "id" and "duplicate" in rejects[2].reason
    with pytest.raises(RecordError, match="row 2"):
        list(iter_records(str(p), mode="strict"))


@pytest.mark.parametrize(
    "name,content,fragment",
    [
        ("empty.jsonl", "", "empty"),
        ("blank.jsonl", "\n\n  \n", "empty"),
        ("empty.json", "[]", "empty"),
        ("trunc.json", '[{"task": "CC"}, {"task": "C', "truncated"),
        ("nolist.json", '"just a string"', "expected a JSON list"),
        ("records.csv", "a,b\n1,2\n", "unsupported file type"),
    ],
)
def test_bad_files_raise_source_error(tmp_path, name, content, fragment):
    p = tmp_path / name
    p.write_text(content)
    with pytest.raises(SourceError, match=fragment):
        list(iter_records(str(p), mode="collect"))


def test_missing_and_corrupt_parquet(tmp_path):
    with pytest.raises(SourceError, match="no such file"):
        list(iter_records(str(tmp_path / "nope.jsonl")))
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 not really parquet")
    with pytest.raises(SourceError, match="Parquet"):
        list(iter_records(str(bad)))


def test_truncated_jsonl_last_line_is_a_reject(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps(cc_row(id="a")) + "\n" + json.dumps(cc_row(id="b"))[:40])
    res = load_records(str(p), mode="collect")
    assert [r.id for r in res.records] == ["a"] and len(res.rejects) == 1 and res.total == 2


def test_read_over_http(http_root, tmp_path):
    root, base = http_root
    write_jsonl(root / "remote.jsonl", [cc_row(id="h1"), sr_row(id="h2")])
    res = load_records(f"{base}/remote.jsonl")
    assert [r.id for r in res.records] == ["h1", "h2"]


def test_read_from_s3(s3_bucket, tmp_path):
    import boto3

    pqp = tmp_path / "r.parquet"
    pq.write_table(pa.Table.from_pylist([cc_row(id="s1"), sr_row(id="s2")]), pqp)
    boto3.client("s3").upload_file(str(pqp), s3_bucket, "data/r.parquet")
    res = load_records(f"s3://{s3_bucket}/data/r.parquet")
    assert [r.id for r in res.records] == ["s1", "s2"]


def test_hf_dataset_url_goes_through_fsspec():
    # A hub download cannot happen here: stand in a memory filesystem for the `hf` protocol and
    # check that an `hf://datasets/...` URL of a JSON list is read through fsspec like any other.
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    class FakeHub(MemoryFileSystem):
        protocol = "hf"
        store: dict = {}
        pseudo_dirs = [""]

        @classmethod
        def _strip_protocol(cls, path):
            return "/" + str(path).removeprefix("hf://").lstrip("/")

    fsspec.register_implementation("hf", FakeHub, clobber=True)
    try:
        with fsspec.open("hf://datasets/NingLab/MMECInstruct/dataset.json", "w") as fh:
            fh.write(json.dumps([cc_row(id="hf1")]))
        res = load_records("hf://datasets/NingLab/MMECInstruct/dataset.json")
        assert [r.id for r in res.records] == ["hf1"]
    finally:
        from huggingface_hub import HfFileSystem

        fsspec.register_implementation("hf", HfFileSystem, clobber=True)


def test_record_round_trip_to_row():
    rec = parse_record(cc_row(id="x"))
    again = parse_record(rec.to_row())
    assert isinstance(again, Record) and again.id == "x" and again.input == rec.input
