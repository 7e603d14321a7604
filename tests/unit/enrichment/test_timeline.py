"""The scaling timeline: nodes joining and leaving, each pool's working actors, the most at once."""

from caslie_core.enrichment.timeline import Timeline

GPU = {"CPU": 1.0, "GPU": 1.0}


def test_nodes_there_at_the_start_are_not_events_and_joins_and_departures_are():
    t = Timeline()
    t.see_nodes({"head": {"CPU": 2.0}}, t=100.0)
    t.see_nodes({"head": {"CPU": 2.0}, "gpu-1": GPU}, t=103.5)
    t.see_nodes({"head": {"CPU": 2.0}, "gpu-1": GPU, "gpu-2": GPU}, t=114.0)
    t.see_nodes({"head": {"CPU": 2.0}, "gpu-2": GPU}, t=130.0)
    s = t.summary(100.0)
    assert [(n["node"], n["added_s"], n["removed_s"]) for n in s["nodes"]] == [
        ("gpu-1", 3.5, 30.0),
        ("gpu-2", 14.0, None),
    ]
    assert s["nodes"][0]["resources"] == GPU


def test_a_node_that_leaves_and_comes_back_is_seen_again():
    t = Timeline()
    t.see_nodes({}, t=0.0)
    t.see_nodes({"n": GPU}, t=1.0)
    t.see_nodes({}, t=2.0)
    t.see_nodes({"n": GPU}, t=3.0)
    assert [(n["added_s"], n["removed_s"]) for n in t.summary(0.0)["nodes"]] == [(3.0, None)]


def test_pool_peak_counts_actors_whose_work_overlaps():
    t = Timeline()
    t.batch("captioner.pool", "a1", "gpu-1", 32, t=10.0)
    t.batch("captioner.pool", "a1", "gpu-1", 32, t=40.0)
    t.batch("captioner.pool", "a2", "gpu-2", 32, t=30.0)
    t.batch("captioner.pool", "a2", "gpu-2", 8, t=39.0)
    t.batch("judges.0.pool", "j1", "head", 32, t=12.0)
    t.batch("judges.0.pool", "j2", "head", 32, t=13.0)  # one batch each, at different times: never together
    s = t.summary(0.0, last_record=41.0)
    cap = s["pools"]["captioner.pool"]
    assert (cap["peak_actors"], cap["peak_at_s"]) == (2, 30.0)
    assert [(a["actor"], a["batches"], a["rows"], a["first_batch_s"]) for a in cap["actors"]] == [
        ("a1", 2, 64, 10.0),
        ("a2", 2, 40, 30.0),
    ]
    assert s["pools"]["judges.0.pool"]["peak_actors"] == 1
    assert (s["first_batch_s"], s["last_record_s"]) == (10.0, 41.0)


def test_actor_records_merge_into_the_drivers_timeline_and_read_as_lines_in_time_order():
    actors = Timeline()
    actors.batch("captioner.pool", "a1", "fff01", 32, t=11.3)
    actors.batch("captioner.pool", "a2", "fff02", 32, t=32.2)
    actors.batch("captioner.pool", "a1", "fff01", 32, t=35.0)
    driver = Timeline()
    driver.see_nodes({"fff00": {"CPU": 2.0}}, t=0.0)
    driver.see_nodes({"fff00": {"CPU": 2.0}, "fff01": GPU}, t=3.4)
    driver.merge(actors.events())
    lines = Timeline.lines(driver.summary(0.0, last_record=39.5))
    assert lines == [
        "+3.4s node fff01 (CPU 1, GPU 1) added",
        "+11.3s captioner.pool: actor 1 first batch (node fff01)",
        "+32.2s captioner.pool: actor 2 first batch (node fff02)",
        "+32.2s captioner.pool: 2 actors working at once",
        "+39.5s last record written",
    ]


def test_an_empty_timeline_summarises_to_nothing():
    s = Timeline().summary(0.0)
    assert s == {"nodes": [], "pools": {}, "batch_fallbacks": {}, "first_batch_s": None, "last_record_s": None}
    assert Timeline.lines(s) == []


def test_batches_redone_item_by_item_add_up_per_model_over_the_actors():
    t = Timeline(clock=lambda: 5.0)
    t.batch("captioner.pool", "a1", "n1", 8, fallbacks={"captioner": (2, False)})
    t.batch("captioner.pool", "a1", "n1", 8, fallbacks={"captioner": (1, True)})
    t.batch("captioner.pool", "a2", "n1", 8, fallbacks={"captioner": (3, False), "judge_x": (1, False)})
    t.batch("judges.0.pool", "a3", "n1", 8)
    other = Timeline()
    other.merge(t.events())  # as the driver merges the helper actor's records
    assert other.summary(0.0)["batch_fallbacks"] == {
        "captioner": {"batches_redone": 6, "running_at_batch_size_1": True},
        "judge_x": {"batches_redone": 1, "running_at_batch_size_1": False},
    }
