from typing import Literal

import pytest
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
