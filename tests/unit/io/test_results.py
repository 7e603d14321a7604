"""The result store (`caslie_core.io.results`): keys that miss when anything that decides a result changed,
atomic parts that many writers and a killed writer leave readable, stats and pruning, locally and on S3."""

from __future__ import annotations

import threading
import time

import pytest

from caslie_core.config.enrich import CaptionerConfig, JudgeConfig
from caslie_core.io.results import CAPTIONS, VOTES, ResultStore, caption_model, judge_model, result_key


def test_keys_miss_when_the_model_its_revision_or_a_setting_changes():
    base = CaptionerConfig(model="org/vlm", revision="abc")
    m = caption_model(base, 336)
    assert m == caption_model(CaptionerConfig(model="org/vlm", revision="abc"), 336)
    others = [
        caption_model(CaptionerConfig(model="org/vlm", revision="def"), 336),
        caption_model(CaptionerConfig(model="org/vlm", revision="abc", max_new_tokens=64), 336),
        caption_model(base, 560),  # the image decoded to another size: other pixels
        caption_model(
            CaptionerConfig(model="org/vlm", revision="abc", engine="openai", openai={"base_url": "http://h/v1"}), 336
        ),
    ]
    assert len({m, *others}) == 5
    k = result_key(m, "digest1", "Describe the mug.")
    assert k != result_key(m, "digest2", "Describe the mug.") != result_key(m, "digest1", "Describe the cup.")
    j = JudgeConfig(name="a", model="org/lm")
    assert judge_model(j) != judge_model(JudgeConfig(name="b", model="org/lm", mode="generate"))
    assert judge_model(j) == judge_model(JudgeConfig(name="renamed", model="org/lm"))  # the name decides nothing


def test_written_results_are_found_by_key_and_model(tmp_path):
    store = ResultStore(str(tmp_path / "store"))
    m = caption_model(CaptionerConfig(model="org/vlm"), 32)
    rows = [{"key": result_key(m, f"d{i}", "p"), "value": f"caption {i}", "model": m} for i in range(5)]
    rows.append({"key": result_key(m, "empty", "p"), "value": None, "model": m})  # no caption is a result too
    store.write(CAPTIONS, rows, run_id="r1")
    found = store.lookup(CAPTIONS, [r["key"] for r in rows] + ["missing"])
    assert {k: v["value"] for k, v in found.items()} == {r["key"]: r["value"] for r in rows}
    assert found[rows[0]["key"]]["run_id"] == "r1"
    assert store.lookup(CAPTIONS, [rows[0]["key"]], model="another") == {}
    assert store.lookup(VOTES, [rows[0]["key"]]) == {}
    assert sorted(k for k, *_ in store.scan(CAPTIONS, {m})) == sorted(r["key"] for r in rows)


def test_many_writers_and_a_killed_writer_leave_the_store_readable(tmp_path):
    store = ResultStore(str(tmp_path / "store"))

    def writer(w: int) -> None:
        for b in range(5):
            batch = [{"key": f"w{w}-b{b}-{i}", "value": "yes", "model": "j"} for i in range(20)]
            ResultStore(str(tmp_path / "store")).write(VOTES, batch, run_id=f"run{w}")

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    killed = tmp_path / "store" / "votes" / ".tmp-deadbeef-part-x.parquet"
    killed.write_bytes(b"PAR1 half a part")  # what a writer killed mid-write leaves
    stats = store.stats()
    assert stats[VOTES]["keys"] == 4 * 5 * 20 and stats[VOTES]["parts"] == 20 and stats[VOTES]["by_model"] == {"j": 400}
    assert len(store.lookup(VOTES, [f"w{w}-b4-19" for w in range(4)])) == 4
    old = time.time() + 2 * 3600  # two hours on, the temporary part is a killed writer's: swept
    assert store.prune(10 * 24 * 3600, now=old)["temporaries_swept"] == 1 and not killed.exists()


def test_prune_drops_what_is_older_than_asked(tmp_path):
    store = ResultStore(str(tmp_path / "store"))
    store.write(CAPTIONS, [{"key": "old", "value": "a", "model": "m"}], run_id="r1")
    time.sleep(0.2)
    cut = time.time()
    store.write(CAPTIONS, [{"key": "new", "value": "b", "model": "m"}], run_id="r2")
    out = store.prune(1000, now=cut + 1000)  # older than 1000 s at cut + 1000: written before the cut
    assert out["removed"] == 1 and set(store.lookup(CAPTIONS, ["old", "new"])) == {"new"}


def test_the_store_on_s3(s3_bucket):
    store = ResultStore(f"s3://{s3_bucket}/results")
    store.write(CAPTIONS, [{"key": "k", "value": "v", "model": "m"}], run_id="r")
    assert store.lookup(CAPTIONS, ["k"])["k"]["value"] == "v" and store.stats()[CAPTIONS]["keys"] == 1


@pytest.mark.parametrize("kind", ["labels"])
def test_an_unknown_kind_is_refused(tmp_path, kind):
    with pytest.raises(ValueError, match="unknown result kind"):
        ResultStore(str(tmp_path)).write(kind, [{"key": "k", "value": "v", "model": "m"}], run_id="r")


def test_a_runs_parts_merge_into_one_and_the_index_spreads_keys_over_shards(tmp_path):
    """A run's per-batch parts become one part; other runs' parts are left alone; the lookup index of each shard
    holds its share of the keys of the models asked for, and together the shards hold every key once."""
    from caslie_core.io.results import ResultIndex, shard_of

    path = str(tmp_path / "store")
    store = ResultStore(path)
    for b in range(6):
        store.write(
            VOTES, [{"key": result_key("j", f"{b}-{i}"), "value": "yes", "model": "j"} for i in range(30)], "r1"
        )
    store.write(VOTES, [{"key": result_key("other", "x"), "value": "no", "model": "other"}], "r2")
    assert store.merge_run("r1") == {"votes": 6}
    names = [p.rsplit("/", 1)[-1] for p in store.parts(VOTES)]
    assert len(names) == 2 and sum(n.startswith("part-r1-") for n in names) == 1
    assert store.stats()["votes"]["keys"] == 181
    shards = [ResultIndex(path, {VOTES: {"j"}}, shard, 3) for shard in range(3)]
    sizes = [len(s.found[VOTES]) for s in shards]
    assert sum(sizes) == 180 and min(sizes) > 30, sizes
    key = result_key("j", "2-7")
    owner = shards[shard_of(key, 3)]
    assert owner.get(VOTES, [key, "absent"]) == {key: ("yes", None, "r1")}
    assert owner.stats()["asked"] == 2 and owner.stats()["hits"] == 1
