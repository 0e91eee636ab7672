"""benchmarks/demo_sweep.py: a run folder and its /usr/bin/time report become one table row."""
import importlib.util
import json
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "demo_sweep", Path(__file__).resolve().parents[1] / "benchmarks" / "demo_sweep.py")
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)

TIME_V = """\tCommand being timed: "fvlm demo --out runs/x"
\tUser time (seconds): 700.25
\tSystem time (seconds): 49.75
\tElapsed (wall clock) time (h:mm:ss or m:ss): 1:02:03
\tMaximum resident set size (kbytes): 1048576
"""


def _run(tmp_path: Path) -> Path:
    run = tmp_path / "c48"
    (run / "results" / "fvlm").mkdir(parents=True)
    diags = {"lung_nodule": {"auc": {"value": 0.61}}, "splenomegaly": {"auc": {"value": 1.0}},
             "renal_cyst": {"auc": {"value": None}}}
    (run / "results" / "fvlm" / "results.json").write_text(json.dumps(
        {"zeroshot": {"macro": {"overall": {"auc": {"value": 0.8, "ci": [0.7, 0.9]}}}, "diagnoses": diags}}))
    (run / "summary.json").write_text(json.dumps({"timings_s": {"pretrain_fvlm": 300.4}}))
    (tmp_path / "c48.time").write_text(TIME_V)
    return run


def test_time_report_parses_cpu_wall_and_rss(tmp_path):
    (tmp_path / "t").write_text(TIME_V)
    r = sweep.time_report(tmp_path / "t")
    assert r["cpu_s"] == pytest.approx(750.0)
    assert r["wall_s"] == pytest.approx(3723.0)
    assert r["peak_rss_mb"] == pytest.approx(1024.0)


def test_row_and_markdown(tmp_path, capsys):
    run = _run(tmp_path)
    assert sweep.main([f"{run}=crop 48^3", "--json", str(tmp_path / "rows.json")]) == 0
    table = capsys.readouterr().out.splitlines()
    # only focal findings the run evaluated get a column; a skipped AUC reads n/a
    assert table[0] == "| change | macro AUC [95% CI] | lung_nodule | renal_cyst | CPU-s | pretrain wall s | peak RSS MB |"
    assert table[2] == "| crop 48^3 | 0.800 [0.700, 0.900] | 0.61 | n/a | 750 | 300 | 1024 |"
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert rows[0]["auc"]["splenomegaly"] == 1.0 and rows[0]["cpu_s"] == pytest.approx(750.0)


def test_eval_split_row_prints_ci_next_to_every_auc_and_cpu_from_summary(tmp_path, capsys):
    run = tmp_path / "big"
    (run / "results_eval" / "fvlm").mkdir(parents=True)
    diags = {"lung_nodule": {"auc": {"value": 0.61, "ci": [0.5, 0.72]}, "support": {"positives": 40}},
             "renal_cyst": {"auc": {"value": 0.9, "ci": [0.85, 0.95]}, "support": {"positives": 35}}}
    (run / "results_eval" / "fvlm" / "results.json").write_text(json.dumps(
        {"zeroshot": {"macro": {"overall": {"auc": {"value": 0.8, "ci": [0.7, 0.9]}}}, "diagnoses": diags}}))
    (run / "summary.json").write_text(json.dumps({"timings_s": {"pretrain_fvlm": 300.0},
                                                  "cpu_s": {"total": 1234.4}}))
    assert sweep.main([f"{run}=aux", "--eval"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[2] == "| aux | 0.800 [0.700, 0.900] | 0.61 [0.50, 0.72] | 0.90 [0.85, 0.95] | 1234 | 300 | n/a |"
    with pytest.raises(FileNotFoundError):   # the run has no results/ (test split) folder
        sweep.main([f"{run}=aux"])
