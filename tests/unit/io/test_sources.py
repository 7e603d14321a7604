"""How a catalog on disk becomes records: the folder rule, JSON Lines as the format defines it (a BOM, CRLF, line
separators inside strings), and `caslie validate`, the job's reader and the folder rule agreeing."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from caslie_core.errors import SourceError
from caslie_core.io.sources import load_records, reading_plan, split_json_lines, survey
from caslie_core.synthetic import write_catalog


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """A `caslie synth` folder: records.jsonl, records.parquet (the same records), manifest.json, images/."""
    root = tmp_path_factory.mktemp("synth")
    write_catalog(root, 12, seed=3)
    return root


def awkward_lines(rows: list[dict]) -> bytes:
    """JSON Lines as other tools write them: a BOM, CRLF, raw U+2028/U+0085 in strings (legal JSON), blank lines."""
    rows = [dict(r) for r in rows]
    rows[0]["instruction"] = rows[0]["instruction"] + "\u2028second line"
    rows[1]["instruction"] = rows[1]["instruction"] + "\u0085next"
    body = "\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\r\n\r\n"
    return b"\xef\xbb\xbf" + body.encode("utf-8")


def test_a_folder_of_one_format_is_read_whole_and_its_metadata_files_are_ignored(synth, tmp_path):
    jsonl_only = tmp_path / "c"
    jsonl_only.mkdir()
    (jsonl_only / "a.jsonl").write_text((synth / "records.jsonl").read_text())
    (jsonl_only / "manifest.json").write_text("{}")
    (jsonl_only / "_SUCCESS").write_text("")
    (jsonl_only / ".tmp-x.jsonl").write_text("junk")
    (jsonl_only / "notes.txt").write_text("hello")
    found = survey(str(jsonl_only))
    assert [p.rsplit("/", 1)[-1] for p in found.files] == ["a.jsonl"]
    assert sorted(p.rsplit("/", 1)[-1] for p in found.ignored) == [
        ".tmp-x.jsonl",
        "_SUCCESS",
        "manifest.json",
        "notes.txt",
    ]
    assert "1 file: a.jsonl; not records, ignored:" in found.line()
    assert len(load_records(str(jsonl_only)).records) == 12


def test_a_folder_with_json_and_parquet_records_is_refused_naming_both_and_the_fix(synth):
    for read in (lambda: survey(str(synth)), lambda: reading_plan(str(synth)), lambda: load_records(str(synth))):
        with pytest.raises(SourceError) as e:
            read()
        msg = str(e.value)
        assert "two formats" in msg and "records.jsonl" in msg and "records.parquet" in msg
        assert "input.format" in msg and "manifest" not in msg


@pytest.mark.parametrize("fmt, name", [("parquet", "records.parquet"), ("jsonl", "records.jsonl")])
def test_input_format_picks_one_side_of_a_mixed_folder(synth, fmt, name):
    plan = reading_plan(str(synth), fmt)
    assert [r.path.rsplit("/", 1)[-1] for r in plan] == [name]
    assert any(p.endswith("manifest.json") for p in plan.found.ignored)
    other = "records.jsonl" if fmt == "parquet" else "records.parquet"
    assert any(p.endswith(other) for p in plan.found.ignored)


def test_files_listed_one_by_one_in_two_formats_are_a_mixed_plan(synth):
    plan = reading_plan([str(synth / "records.jsonl"), str(synth / "records.parquet")])
    assert plan.mixed and [r.reader for r in plan] == ["text", "parquet"]
    assert not reading_plan(str(synth / "records.jsonl")).mixed


def test_json_lines_split_only_at_newline_with_a_bom_crlf_and_line_separators_in_strings(synth, tmp_path):
    rows = [json.loads(line) for line in open(synth / "records.jsonl")]
    data = awkward_lines(rows)
    assert len(data.decode("utf-8").splitlines()) > len(rows) + 1  # what str.splitlines (read_text) made of it
    lines = split_json_lines(data, "x.jsonl")
    assert [json.loads(line)["id"] for line in lines] == [r["id"] for r in rows]
    assert "\u2028" in json.loads(lines[0])["instruction"]
    path = tmp_path / "awkward.jsonl"
    path.write_bytes(data)
    result = load_records(str(path), mode="collect")  # `caslie validate` and training read it the same way
    assert [r.id for r in result.records] == [r["id"] for r in rows] and not result.rejects
    listed = tmp_path / "list.json"  # a JSON list with a BOM
    listed.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows, ensure_ascii=False).encode())
    assert len(load_records(str(listed)).records) == len(rows)


def test_bytes_that_are_not_utf8_fail_the_file_naming_the_line():
    with pytest.raises(SourceError, match=r"x.jsonl: line 2 is not UTF-8"):
        split_json_lines(b'{"a": 1}\n{"a": "\xff"}\n', "x.jsonl")


def test_a_parquet_only_folder_ignores_its_json_metadata(synth, tmp_path):
    folder = tmp_path / "pq"
    folder.mkdir()
    pq.write_table(pq.read_table(synth / "records.parquet"), folder / "part-0.parquet")
    (folder / "dataset_info.json").write_text("{}")
    pq.write_table(pa.table({"x": [1]}), folder / "_metadata")
    plan = reading_plan(str(folder))
    assert [r.reader for r in plan] == ["parquet"] and len(plan.found.ignored) == 2


def test_training_and_evaluation_inputs_follow_the_same_folder_rule(synth):
    from caslie_core.io.store import classify_inputs

    inputs = classify_inputs(str(synth))
    assert not inputs.records and len(inputs.problems) == 1 and "two formats" in inputs.problems[0]
