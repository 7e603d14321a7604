from typing import Literal

import pytest
from helpers import ROOT
from pydantic import Field

from caslie_core.config import StrictModel, apply_overrides, config_hash, load_config
from caslie_core.errors import ConfigError


class Pool(StrictModel):
    min_size: int = Field(1, ge=1, description="smallest pool")
    max_size: int = Field(2, ge=1, description="largest pool")


class Job(StrictModel):
    name: str = Field(description="run name")
    mode: Literal["generate", "logits"] = Field("logits", description="judge mode")
    lr: float = Field(1e-4, gt=0, description="learning rate")
    pool: Pool = Field(default_factory=Pool, description="actor pool")


def test_yaml_plus_dotted_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: demo\npool:\n  min_size: 1\n")
    cfg = load_config(Job, p, ["pool.max_size=4", "lr=3e-5", "mode=generate"])
    assert cfg.pool.max_size == 4 and cfg.lr == 3e-5 and cfg.mode == "generate" and cfg.name == "demo"


def test_all_problems_reported_at_once_with_paths_and_valid_keys(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("pool:\n  min_sise: 2\n  max_size: zero\nmode: beam\nlr: -1\n")
    with pytest.raises(ConfigError) as e:
        load_config(Job, p)
    msg = str(e.value)
    assert len(e.value.problems) == 5
    assert "name: required, missing" in msg
    assert "pool.min_sise: unknown key; valid keys here: max_size, min_size" in msg
    assert "pool.max_size" in msg and "'zero'" in msg
    assert "mode:" in msg and "'generate'" in msg and "'logits'" in msg
    assert "lr:" in msg and str(p) in msg


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(Job, None, ["name"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(Job, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Job, bad)


def test_overrides_create_nested_sections_and_hash_is_stable():
    assert apply_overrides({}, ["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}
    a = load_config(Job, None, ["name=x"])
    b = load_config(Job, None, ["name=x", "pool.min_size=1"])
    assert config_hash(a) == config_hash(b)


def test_list_index_overrides():
    data = {"judges": [{"mode": "logits"}, {"mode": "logits"}]}
    assert apply_overrides(data, ["judges.1.mode=generate"])["judges"][1]["mode"] == "generate"
    with pytest.raises(ConfigError, match="not a valid index"):
        apply_overrides(data, ["judges.5.mode=generate"])


# --- `--set` values are typed by the target field (YAML 1.2 core schema where the field is not a string) ---

ENRICH_DEMO = ROOT / "configs" / "enrich-demo.yaml"


def _enrich(*overrides: str):
    from caslie_core.config import EnrichConfig

    return load_config(EnrichConfig, ENRICH_DEMO, list(overrides))


def test_string_fields_keep_the_text_as_typed():
    cfg = _enrich("captioner.revision=1234567", "captioner.model=0123", "judges.1.name=no")
    assert cfg.captioner.revision == "1234567" and cfg.captioner.model == "0123" and cfg.judges[1].name == "no"
    assert _enrich("captioner.revision=0123").captioner.revision == "0123"
    assert _enrich("captioner.revision=2024-01-01").captioner.revision == "2024-01-01"
    assert _enrich("captioner.revision=true").captioner.revision == "true"
    # a field that takes None: null/~/empty unset it; quoted, it is the text
    assert _enrich("captioner.revision=abc", "captioner.revision=null").captioner.revision is None
    assert _enrich("captioner.revision=~").captioner.revision is None
    assert _enrich("captioner.revision=").captioner.revision is None
    assert _enrich("captioner.revision='null'").captioner.revision == "null"
    assert _enrich('captioner.revision="0123"').captioner.revision == "0123"


def test_string_or_list_fields_and_flow_collections():
    assert _enrich("input.path=[a,b]").input.path == ["a", "b"]
    assert _enrich("input.path=[a, 012, no]").input.path == ["a", "012", "no"]  # items typed as str too
    assert _enrich("input.path=0123").input.path == "0123"
    assert _enrich("fetch.allowlist=[10.0.0.1, 1234]").fetch.allowlist == ["10.0.0.1", "1234"]
    # a flow collection is a collection for every field (pydantic reports it); quoted, it is text
    with pytest.raises(ConfigError, match="output.path: Input should be a valid string"):
        _enrich("output.path=[a,b]")
    assert _enrich("output.path='[a,b]'").output.path == "[a,b]"


def test_literal_and_list_index_overrides_with_a_model():
    cfg = _enrich("judges.0.mode=generate", "captioner.dtype=float32")
    assert cfg.judges[0].mode == "generate" and cfg.captioner.dtype == "float32"
    with pytest.raises(ConfigError, match="not a valid index"):
        _enrich("judges.5.mode=generate")


def test_bool_fields_get_yaml_12_booleans_and_pydantic_decides_the_rest():
    from caslie_core.config import EnrichConfig, read_yaml

    assert _enrich("dedup.enabled=false").dedup.enabled is False
    assert _enrich("dedup.enabled=false", "dedup.enabled=True").dedup.enabled is True
    assert _enrich("dedup.enabled=TRUE").dedup.enabled is True
    # `no` is not a YAML 1.2 boolean: it reaches pydantic as the string "no", which pydantic's own
    # (documented) bool parsing takes as False; words it does not know are reported with the input
    data = apply_overrides(read_yaml(ENRICH_DEMO), ["dedup.enabled=no", "fetch.block_private=off"], model=EnrichConfig)
    assert data["dedup"]["enabled"] == "no" and data["fetch"]["block_private"] == "off"
    assert _enrich("dedup.enabled=no").dedup.enabled is False
    with pytest.raises(ConfigError, match=r"dedup.enabled: Input should be a valid boolean.*\(got 'maybe'\)"):
        _enrich("dedup.enabled=maybe")


def test_number_and_null_fields():
    cfg = _enrich("records_per_batch=012", "fetch.threads=0x10", "fetch.connect_timeout=1e1", "ray.num_cpus=null")
    assert cfg.records_per_batch == 12 and cfg.fetch.threads == 16
    assert cfg.fetch.connect_timeout == 10.0 and cfg.ray.num_cpus is None
    with pytest.raises(ConfigError, match=r"records_per_batch: .*\(got 'many'\)"):
        _enrich("records_per_batch=many")


def test_train_overrides_float_and_literal_or_list():
    from caslie_core.config import TrainConfig

    path = ROOT / "configs" / "train-demo.yaml"
    cfg = load_config(TrainConfig, path, ["optim.lr=1e-4", "lora.target_modules=all-linear", "data.tasks=[012, no]"])
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == 1e-4
    assert cfg.lora.target_modules == "all-linear" and cfg.data.tasks == ["012", "no"]
    assert load_config(TrainConfig, path, ["lora.target_modules=[q_proj, v_proj]"]).lora.target_modules == [
        "q_proj",
        "v_proj",
    ]


def test_dict_values_are_typed_by_the_dict():
    from caslie_core.config import ServeConfig

    path = ROOT / "configs" / "serve-demo.yaml"
    assert load_config(ServeConfig, path, ["model.adapters.red=0123"]).model.adapters == {"red": "0123"}
    assert load_config(ServeConfig, path, ["model.adapters={red: 0123, blue: no}"]).model.adapters == {
        "red": "0123",
        "blue": "no",
    }


def test_without_a_model_values_follow_yaml_12_core_schema():
    values = ["on", "off", "yes", "no", "y", "True", "FALSE", "012", "0o17", "0x1F", "-3", "1e-4", ".5", "-.inf"]
    values += ["null", "~", "", "2024-01-01", "[no, 012, 1.5, null]", "{a: 1, b: off}", "'012'", "[unclosed"]
    data = apply_overrides({}, [f"v{i}={v}" for i, v in enumerate(values)])
    got = [data[f"v{i}"] for i in range(len(values))]
    assert got[:8] == ["on", "off", "yes", "no", "y", True, False, 12] and type(got[7]) is int
    assert got[8:14] == [15, 31, -3, 1e-4, 0.5, float("-inf")] and type(got[11]) is float
    assert got[14:17] == [None, None, None] and got[17] == "2024-01-01"
    assert got[18:] == [["no", 12, 1.5, None], {"a": 1, "b": "off"}, "012", "[unclosed"]


def test_a_store_mode_without_a_store_path_names_the_key_and_the_fix():
    from caslie_core.config import EnrichConfig

    with pytest.raises(ConfigError, match=r"store.mode=read_only without store.path: set store.path"):
        load_config(EnrichConfig, ENRICH_DEMO, ["store.mode=read_only"])
    off = load_config(EnrichConfig, ENRICH_DEMO, ["store.mode=off"]).store
    assert not off.reads and not off.writes
    ro = load_config(EnrichConfig, ENRICH_DEMO, ["store.path=s3://b/store", "store.mode=read_only"]).store
    assert ro.reads and not ro.writes
    assert not load_config(EnrichConfig, ENRICH_DEMO).store.reads  # no path: the store is off
