"""The training plan (Ray-free): data resolution and counts, checks that fail before any worker starts."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import ROOT, train_config

from caslie_core.errors import ConfigError


def _enriched_row(i: int, status: str, split: str) -> dict:
    from caslie_core.io.store import OUTPUT_COLUMNS

    row = {c: None for c in OUTPUT_COLUMNS}
    row.update(
        {
            "id": f"r{i}",
            "task": "sentiment_analysis",
            "split": split,
            "status": status,
            "n_images": 1,
            "n_failed_images": 0,
            "n_kept": 0,
        }
    )
    if status != "failed":
        row.update(
            {
                "instruction": "Choose the sentiment.",
                "output": "A",
                "options": json.dumps(["A: pos", "B: neg"]),
                "input": json.dumps({"review": "great", "product information extracted from image": "a mug"}),
                "original_input": json.dumps({"review": "great"}),
                "original_options": json.dumps(["A: pos"]),
            }
        )
    else:
        row["error"] = {"stage": "validate", "message": "bad"}
    return row


@pytest.fixture
def enriched(tmp_path):
    from caslie_core.io.store import output_schema

    rows = (
        [_enriched_row(i, "ok", "train") for i in range(6)]
        + [_enriched_row(10 + i, "partial", "train") for i in range(3)]
        + [_enriched_row(20 + i, "failed", "train") for i in range(4)]
        + [_enriched_row(30 + i, "ok", "validation") for i in range(2)]
    )
    part = tmp_path / "out" / "records" / "task=sentiment_analysis"
    part.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=output_schema()), part / "part-1.parquet")
    return tmp_path / "out"


def _cfg(data_path, tmp_path, *overrides):
    return train_config(data_path, tmp_path, *overrides)


def test_failed_rows_are_skipped_and_counted_partial_ones_train(enriched, tmp_path, tiny_models):
    from caslie_core.training.data import tokenize_batch
    from caslie_core.training.plan import plan_training

    plan = plan_training(_cfg(enriched, tmp_path))
    assert plan.train.as_dict() == {"ok": 6, "partial": 3, "failed": 4, "usable": 9}
    assert plan.eval.usable == 2 and plan.n_train == 9
    table = pq.read_table(plan.enriched_files[0])
    out = tokenize_batch(
        table, tokenizer="tiny:lm", style="alpaca", captions="auto", max_length=128, split="train", task_names=None
    )
    assert sorted(out.column("id").to_pylist()) == sorted(
        [f"r{i}" for i in range(6)] + [f"r{10 + i}" for i in range(3)]
    )
    assert not any(out.column("truncated").to_pylist())
    short = tokenize_batch(
        table, tokenizer="tiny:lm", style="alpaca", captions="auto", max_length=24, split="train", task_names=None
    )
    assert all(short.column("truncated").to_pylist()) and max(short.column("n_tokens").to_pylist()) == 24


def test_task_filter(enriched, tmp_path, tiny_models):
    from caslie_core.training.plan import plan_training

    with pytest.raises(ConfigError, match="no usable rows in split 'train'"):
        plan_training(_cfg(enriched, tmp_path, "data.tasks=[CC]"))
    assert plan_training(_cfg(enriched, tmp_path, "data.tasks=[SA]")).n_train == 9


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["lora.target_modules=[q_proj,qkv_proj]"], "lora.target_modules: ['qkv_proj'] not in the model"),
        (["lora.modules_to_save=[score]"], "lora.modules_to_save: ['score'] not in the model"),
        (["data.eval_split=test"], "data.eval_split: no usable rows in split 'test'"),
        (["data.train_split=nonsense"], "data.train_split: unknown split"),
        (["model.model=/nowhere/model"], "model.model: cannot load '/nowhere/model'"),
    ],
)
def test_bad_config_fails_before_any_worker_with_what_to_fix(enriched, tmp_path, tiny_models, overrides, message):
    from ray_jobs import train

    with pytest.raises(ConfigError) as e:
        train.run(_cfg(enriched, tmp_path, *overrides))  # precheck runs before Ray starts
    assert message in str(e.value)


def test_missing_data_and_rank_zero(tmp_path, tiny_models):
    from caslie_core.training.plan import plan_training

    with pytest.raises(ConfigError, match=r"input.path: .*nowhere.jsonl does not exist"):
        plan_training(_cfg(tmp_path / "nowhere.jsonl", tmp_path))
    with pytest.raises(ConfigError, match=r"lora.r: Input should be greater than or equal to 1"):
        _cfg(tmp_path, tmp_path, "lora.r=0")
    with pytest.raises(ConfigError, match="holds no enrichment output"):
        (tmp_path / "empty").mkdir()
        plan_training(_cfg(tmp_path / "empty", tmp_path))


def test_record_files_train_directly(tmp_path, tiny_models):
    from caslie_core.synthetic import write_catalog
    from caslie_core.training.plan import plan_training

    write_catalog(tmp_path / "cat", 40, seed=1, splits={"train": 0.8, "val": 0.2})
    plan = plan_training(_cfg(tmp_path / "cat" / "records.parquet", tmp_path))
    assert plan.record_files and not plan.enriched_files
    assert plan.train.usable + plan.eval.usable == 40


def test_a_catalog_folder_with_images_trains(tmp_path, tiny_models):
    """A folder holding records.jsonl and images/: the image files are not records and must not fail discovery
    (train's copy of the folder scan once raised "a.png: unsupported file type")."""
    import shutil

    from caslie_core.synthetic import write_catalog
    from caslie_core.training.plan import plan_training

    write_catalog(tmp_path / "cat", 30, seed=2, splits={"train": 0.8, "val": 0.2})
    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copy(tmp_path / "cat" / "records.jsonl", folder / "records.jsonl")
    shutil.copytree(tmp_path / "cat" / "images", folder / "images")
    assert any((folder / "images").glob("*.png")) or any((folder / "images").iterdir())
    plan = plan_training(_cfg(folder, tmp_path))
    assert [p.rsplit("/", 1)[-1] for p in plan.record_files] == ["records.jsonl"]
    assert plan.train.usable + plan.eval.usable == 30


def test_data_path_is_accepted_for_one_release_with_a_warning(tmp_path):
    from caslie_core.config import TrainConfig, load_config

    with pytest.warns(FutureWarning, match="data.path is deprecated.*input.path"):
        cfg = load_config(
            TrainConfig,
            ROOT / "configs" / "train-demo.yaml",
            [f"data.path={tmp_path}", f"output.path={tmp_path / 'm'}", f"run.storage_path={tmp_path}"],
        )
    assert cfg.input.path == str(tmp_path)
    assert "path" not in cfg.data.model_dump()


def test_an_old_config_file_with_data_path_still_loads_and_an_explicit_input_path_wins(tmp_path):
    from caslie_core.config import TrainConfig, load_config

    old = (ROOT / "configs" / "train-demo.yaml").read_text().replace("input:\n  path:", "data:\n  path:", 1)
    old = old.replace("data:\n  train_split", "  train_split", 1)  # one data: section, as files had it
    (tmp_path / "old.yaml").write_text(old)
    with pytest.warns(FutureWarning):
        assert load_config(TrainConfig, tmp_path / "old.yaml").input.path == "demo-out/enriched"
    with pytest.warns(FutureWarning):
        assert load_config(TrainConfig, tmp_path / "old.yaml", ["input.path=/new"]).input.path == "/new"


def test_the_default_run_name_is_stable():
    """The default run name (which a rerun resumes) changes only when what is trained changes. It changed
    on purpose with `data.captions` (replacing `use_enriched`): the prompts became the research code's
    rendering, and a run started on the old prompts must not be resumed on the new ones."""
    from caslie_core.config import TrainConfig, load_config
    from caslie_core.training.plan import run_name

    assert run_name(load_config(TrainConfig, ROOT / "configs" / "train-demo.yaml")) == "caslie-train-dcc220df78"


def test_default_run_name_follows_the_settings_that_matter(enriched, tmp_path):
    from caslie_core.training.plan import run_name

    a = _cfg(enriched, tmp_path)
    assert run_name(a) == run_name(_cfg(enriched, tmp_path, "run.max_failures=5", "scaling.num_workers=1"))
    assert run_name(a) != run_name(_cfg(enriched, tmp_path, "optim.lr=0.1"))
    assert run_name(_cfg(enriched, tmp_path, "run.name=mine")) == "mine"
