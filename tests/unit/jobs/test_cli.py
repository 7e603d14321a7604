import json
import subprocess
import sys

import pytest
from helpers import ROOT

from ray_jobs.cli import build_parser, main

SUBCOMMANDS = ["demo", "tiny-models", "synth", "validate", "score", "enrich"]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "ray_jobs.cli", *args], cwd=ROOT, capture_output=True, text=True)


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_help_on_every_subcommand(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([cmd, "--help"])
    assert e.value.code == 0 and "usage: caslie " + cmd in capsys.readouterr().out


def test_score_prints_per_task_json(tmp_path, capsys):
    from caslie_core.synthetic import write_catalog

    m = write_catalog(tmp_path, 14, seed=2)
    rows = [json.loads(line) for line in open(m["jsonl"])]
    preds = [r["output"] for r in rows]
    preds[0] = "nonsense"
    p = tmp_path / "preds.json"
    p.write_text(json.dumps(preds))
    assert main(["score", m["jsonl"], str(p)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"AP", "CC", "PRP", "PSI", "MPC", "SA", "SR"}
    for abbr, s in out.items():
        assert set(s) == {"task", "primary", "score", "strict_score", "invalid", "n"}
        assert s["n"] == 2
        if abbr not in ("AP", "PSI"):  # F1 of yes is 0 when no reference is yes: check letters only
            assert s["score"] == 1.0
    assert out["AP"]["invalid"] == 1 and out["CC"]["invalid"] == 0


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
