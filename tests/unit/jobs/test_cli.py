import json
import subprocess
import sys

import pytest
from helpers import ROOT

from ray_jobs.cli import build_parser, main

SUBCOMMANDS = ["demo", "tiny-models", "synth", "validate", "score", "enrich", "store"]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "ray_jobs.cli", *args], cwd=ROOT, capture_output=True, text=True)


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_help_on_every_subcommand(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([cmd, "--help"])
    assert e.value.code == 0 and "usage: caslie " + cmd in capsys.readouterr().out


def test_score_prints_per_split_then_per_task_json(tmp_path, capsys):
    from caslie_core.evaluation.metrics import score_records
    from caslie_core.io.sources import load_records
    from caslie_core.synthetic import write_catalog

    m = write_catalog(tmp_path, 14, seed=2)
    rows = [json.loads(line) for line in open(m["jsonl"])]
    preds = [r["output"] for r in rows]
    preds[0] = "nonsense"
    p = tmp_path / "preds.json"
    p.write_text(json.dumps(preds))
    assert main(["score", m["jsonl"], str(p)]) == 0
    out = json.loads(capsys.readouterr().out)
    present = [s for s in ("train", "val", "test", "ood_test") if any(r["split"] == s for r in rows)]
    assert list(out) == present and len(present) > 1
    records = load_records(m["jsonl"]).records
    n = {}
    for split, tasks in out.items():
        keep = [i for i, r in enumerate(records) if r.split == split]
        ref = score_records([records[i] for i in keep], [preds[i] for i in keep])
        assert list(tasks) == list(ref)
        for abbr, s in tasks.items():
            assert set(s) == {"task", "primary", "score", "strict_score", "invalid", "n"}
            assert s == {k: v for k, v in ref[abbr].items() if k != "companions"}
            n[abbr] = n.get(abbr, 0) + s["n"]
    assert n == dict.fromkeys(("AP", "CC", "PRP", "PSI", "MPC", "SA", "SR"), 2)

    assert main(["score", m["jsonl"], str(p), "--pooled"]) == 0  # the old flat shape, every row together
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"AP", "CC", "PRP", "PSI", "MPC", "SA", "SR"}
    for abbr, s in out.items():
        assert set(s) == {"task", "primary", "score", "strict_score", "invalid", "n"}
        assert s["n"] == 2
        if abbr not in ("AP", "PSI"):  # F1 of yes is 0 when no reference is yes: check letters only
            assert s["score"] == 1.0
    assert out["AP"]["invalid"] == 1 and out["CC"]["invalid"] == 0


def _cc(i, split, output):
    return {
        "id": f"cc{i}",
        "task": "CC",
        "instruction": "pick the category",
        "input": {"title": f"t{i}"},
        "options": ["A: a", "B: b", "C: c"],
        "output": output,
        "images": ["u"],
        "split": split,
    }


def test_score_keeps_ind_and_ood_test_apart_unless_pooled(tmp_path, capsys):
    """One task in both test splits: the paper's figures (per split) differ from the pooled one."""
    from caslie_core.evaluation.metrics import score_records
    from caslie_core.io.sources import load_records

    splits = ["OOD", "test", "ind_test", "test", "ood_test"]  # spellings normalise to test / ood_test
    rows = [_cc(i, split, gold) for i, (split, gold) in enumerate(zip(splits, "CAABC"))]
    preds = ["B", "A", "A", "A", "C"]  # in ood_test only C is a gold label there: B is invalid, dropped
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "p.json").write_text(json.dumps(preds))
    records = load_records(str(tmp_path / "r.jsonl")).records

    def score(*extra):
        assert main(["score", str(tmp_path / "r.jsonl"), str(tmp_path / "p.json"), "--details", *extra]) == 0
        return json.loads(capsys.readouterr().out)

    def ref(split=None):
        keep = [i for i, r in enumerate(records) if split is None or r.split == split]
        return score_records([records[i] for i in keep], [preds[i] for i in keep])

    per_split, pooled = score(), score("--pooled")
    assert list(per_split) == ["test", "ood_test"]  # normalised names, in split order, not file order
    assert per_split == {"test": ref("test"), "ood_test": ref("ood_test")}
    assert pooled == ref()
    assert per_split["test"]["CC"]["score"] == round(2 / 3, 6) and per_split["test"]["CC"]["n"] == 3
    assert per_split["ood_test"]["CC"]["score"] == 1.0 and per_split["ood_test"]["CC"]["invalid"] == 1
    assert pooled["CC"]["score"] == 0.6 and pooled["CC"]["invalid"] == 0 and pooled["CC"]["n"] == 5

    assert score("--split", "ood") == {"ood_test": ref("ood_test")}
    assert score("--split", "ood_test", "--pooled") == ref("ood_test")
    assert score("--split", "train") == {"train": {}}


def test_user_errors_exit_2_with_one_line_no_traceback(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("x")
    res = run_cli("validate", str(bad))
    assert res.returncode == 2 and "unsupported file type" in res.stderr and "Traceback" not in res.stderr
    res = run_cli("synth", str(tmp_path / "o"), "--records", "3", "--tasks", "XX")
    assert res.returncode == 2 and "unknown task" in res.stderr


def test_validate_reports_rejects(tmp_path, capsys):
    p = tmp_path / "r.jsonl"
    p.write_text('{"task": "CC", "instruction": "x", "input": "{}", "options": "[]", "images": "[]"}\n')
    assert main(["validate", str(p)]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["rows"] == 1 and out["rejected"] == 1 and out["rejects"][0]["field"] == "input"


def test_version():
    out = run_cli("--version")
    assert out.returncode == 0 and out.stdout.startswith("caslie ")


@pytest.mark.parametrize("job", ["enrich", "train", "evaluate"])
def test_every_job_takes_input_and_output_paths_and_verbose(job):
    args = build_parser().parse_args(
        [job, f"configs/{job}-demo.yaml", "--set", "input.path=X", "--set", "output.path=Y"]
    )
    assert args.overrides == ["input.path=X", "output.path=Y"] and args.verbose is False


def test_store_stats_and_prune(tmp_path, capsys):
    """`caslie store stats` counts keys per model (the identity shown as an object); `prune --older-than` removes
    what is older; a bad or missing age is a one-line error (exit 2)."""
    import time

    from caslie_core.config import CaptionerConfig
    from caslie_core.io.results import CAPTIONS, ResultStore, caption_model, result_key

    path = str(tmp_path / "store")
    m = caption_model(CaptionerConfig(model="org/vlm"), 32)
    ResultStore(path).write(
        CAPTIONS, [{"key": result_key(m, f"d{i}", "p"), "value": "c", "model": m} for i in range(3)], "r1"
    )
    assert main(["store", "stats", path]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["captions"]["keys"] == 3 and out["captions"]["by_model"][0]["model"]["model"] == "org/vlm"
    assert main(["store", "prune", path, "--older-than", "1d"]) == 0
    assert json.loads(capsys.readouterr().out)["removed"] == 0
    time.sleep(0.05)
    assert main(["store", "prune", path, "--older-than", "0.01s"]) == 0
    assert json.loads(capsys.readouterr().out)["removed"] == 3 and ResultStore(path).stats()["captions"]["keys"] == 0
    for bad in (["store", "prune", path], ["store", "prune", path, "--older-than", "3x"]):
        res = run_cli(*bad)
        assert res.returncode == 2 and "Traceback" not in res.stderr and res.stderr.count("\n") == 1, res.stderr
