import pytest

from caslie_core.tasks import TASKS, get_task


def test_seven_tasks_with_layout_labels_and_metric():
    assert list(TASKS) == ["AP", "CC", "PRP", "PSI", "MPC", "SA", "SR"]
    assert get_task("AP").primary_metric == "f1" and get_task("AP").labels() == ("yes", "no")
    assert get_task("PSI").label_kind == "yes_no"
    assert get_task("PRP").primary_metric == "macro_f1" and get_task("PRP").layout == "pair"
    assert get_task("MPC").primary_metric == "accuracy"
    assert get_task("SR").primary_metric == "recall_at_1" and get_task("SR").layout == "sequence"
    assert {t.abbr for t in TASKS.values() if t.has_ood} == {"AP", "CC", "PRP", "SA", "SR"}


@pytest.mark.parametrize("name", ["CC", "cc", "category_classification", " Category_Classification "])
def test_lookup_by_either_name(name):
    assert get_task(name).abbr == "CC"


def test_unknown_task_lists_valid_names():
    with pytest.raises(KeyError) as e:
        get_task("color_guessing")
    assert "AP (answerability_prediction)" in str(e.value)


def test_expected_images_by_layout():
    assert get_task("CC").expected_images({"title": "x"}, []) == 1
    assert get_task("PRP").expected_images({}, ["A: x"]) == 2
    assert get_task("SR").expected_images(["1st: a", "2nd: b"], ["A: c", "B: d", "C: e"]) == 5
