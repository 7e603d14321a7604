"""The stall watch on made-up operator counts (Ray-free): it says where rows wait, only when stalled, and again
every `after_s` while the stall lasts."""

from caslie_core.enrichment.stall import OpView, StallWatch


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _ops(read, caption_in, caption_out=0, written=0, queued=0):
    return [
        OpView("ReadText", read, caption_in, 0, False, "Tasks: 1 [backpressured:outputs(ResourceBudget)]"),
        OpView("MapBatches(CaptionActor)", caption_in, caption_out, queued, True, "Actors: 1 (pending=1)"),
        OpView("MapBatches(write_batch)", caption_out, written, 0, False, "Tasks: 0"),
    ]


def test_rows_read_that_reach_no_model_pool_are_reported_with_where_they_wait():
    clock, said = Clock(), []
    watch = StallWatch(60, said.append, clock)
    for t, read in [(0, 0), (5, 6_000), (30, 40_000), (64, 60_000)]:  # the reader keeps going: not "no progress"
        clock.t = t
        watch.see(_ops(read, 0, queued=0))
    assert said == []  # 59 s since the first rows were read
    clock.t = 66
    line = watch.see(_ops(60_000, 0))
    assert line and said == [line]
    assert "60,000 records read but no batch has reached a model pool for 61 s" in line
    assert "rows wait at ReadText" in line and "backpressured:outputs(ResourceBudget)" in line
    assert "MapBatches(CaptionActor): Actors: 1 (pending=1)" in line  # the pool is named with Ray Data's account
    clock.t = 90
    assert watch.see(_ops(60_000, 0)) is None  # not again before after_s
    clock.t = 126
    assert watch.see(_ops(60_000, 0)) is not None and len(said) == 2


def test_a_plane_that_stops_moving_names_the_operator_holding_the_rows():
    clock, said = Clock(), []
    watch = StallWatch(60, said.append, clock)
    watch.see(_ops(1_000, 1_000, 900, 0))
    clock.t = 59
    assert watch.see(_ops(1_000, 1_000, 900, 0)) is None
    clock.t = 61
    line = watch.see(_ops(1_000, 1_000, 900, 0))
    assert "no operator moved a row for 61 s" in line and "rows wait at MapBatches(write_batch)" in line
    # a row moving resets it
    clock.t = 62
    assert watch.see(_ops(1_000, 1_000, 1_000, 900)) is None


def test_a_moving_plane_and_a_watch_turned_off_say_nothing():
    clock, said = Clock(), []
    watch, off = StallWatch(60, said.append, clock), StallWatch(0, said.append, clock)
    for t in range(0, 600, 10):
        clock.t = t
        ops = _ops(100 * t + 100, 100 * t, 100 * t, 100 * t)
        watch.see(ops)
        off.see(ops)
    assert said == []


def test_a_catalog_is_read_in_blocks_that_keep_every_actor_of_the_widest_pool_busy():
    from caslie_core.enrichment.pipeline import read_blocks

    assert read_blocks(100_000, 128, 1) is None  # one actor per pool: Ray Data's own blocks
    assert read_blocks(None, 128, 4) is None  # size unknown
    assert read_blocks(1_500, 128, 2) == 8  # the autoscaling test's catalog: 4 blocks per actor
    assert read_blocks(300, 128, 8) == 3  # never blocks smaller than records_per_batch
    assert read_blocks(1_000_000, 128, 8) == 100  # never blocks of more than 10,000 records


def test_lines_of_a_text_file_are_estimated_from_its_first_mebibyte(tmp_path):
    import fsspec

    from caslie_core.io.sources import estimate_lines

    path = tmp_path / "records.jsonl"
    path.write_text("".join(f'{{"id": "r{i}", "pad": "{"x" * (i % 50)}"}}\n' for i in range(40_000)))
    fs = fsspec.filesystem("file")
    assert abs(estimate_lines(fs, str(path)) - 40_000) < 40_000 * 0.05
    assert estimate_lines(fs, str(tmp_path / "missing.jsonl")) is None


def test_the_reading_plan_reads_a_files_head_only_when_blocks_are_wanted(tmp_path):
    """A one-actor job (the demo) reads no file's head at start; a wide pool's gets each JSON-lines file estimated."""
    from caslie_core.io.sources import reading_plan

    path = tmp_path / "records.jsonl"
    path.write_text("".join(f'{{"id": "r{i}"}}\n' for i in range(1_000)))
    assert [r.rows for r in reading_plan(str(path))] == [None]
    assert [r.rows for r in reading_plan(str(path), count_lines=True)] == [1_000]
