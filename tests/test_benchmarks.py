"""The benchmark harness and the README results table."""

import json
from pathlib import Path

import numpy as np

from benchmarks import harness, report


def test_save_results_adds_provenance_and_report_builds_the_table(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "RESULTS", tmp_path)
    row = {"algorithm": "Dyna-Q", "setting": "maze | n=5", "metric": "steps", "ours": 17.25,
           "reference": 18, "seeds": 30, "wall_seconds": 1.5}
    path = harness.save_results("demo", {"curve": np.arange(3.0), "headline": [row]})
    record = json.loads(path.read_text())
    assert record["curve"] == [0.0, 1.0, 2.0] and record["machine"]["cores"] >= 1
    assert {"date", "commit", "benchmark"} <= set(record)
    table = report.results_table(tmp_path).splitlines()
    assert len(table) == 3  # header, rule, one row
    assert table[2].startswith("| Dyna-Q | maze / n=5 | steps | 17.2 | 18 | 30 | 1.5 |")


def test_mean_and_stderr_and_grid():
    mean, se = harness.mean_and_stderr([[1.0, 2.0], [3.0, 6.0]])
    np.testing.assert_allclose(mean, [2.0, 4.0])
    np.testing.assert_allclose(se, [1.0, 2.0])  # std (ddof 1) / sqrt(2)
    assert harness.grid(n=[0, 5], env=["a"]) == [{"n": 0, "env": "a"}, {"n": 5, "env": "a"}]


def test_scratch_dir_keeps_run_folders_out_of_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        with harness.scratch_dir() as scratch:
            assert Path.cwd() == Path(scratch).resolve()
            Path("runs").mkdir()  # what an algorithm's Run does
            raise RuntimeError("the algorithm failed")
    except RuntimeError:
        pass
    assert Path.cwd() == tmp_path.resolve()  # restored even after an error
    assert not (tmp_path / "runs").exists() and not Path(scratch).exists()
