"""common/progress.py: the one progress format."""

import numpy as np
import pytest

from common import progress as progress_module
from common.progress import Progress, duration, rounded


def test_duration_and_rounding():
    assert [duration(s) for s in (0, 42.4, 187, 3900, float("inf"))] == ["0s", "42s", "3m07s", "1h05m", "?"]
    assert rounded(10_000) == "10,000" and rounded(np.int64(3)) == "3"
    assert rounded(0.123456) == "0.123" and rounded(-47.23) == "-47.2" and rounded(1234.5) == "1,234"
    assert rounded(1.133e10) == "1.13e+10" and rounded(2e-5) == "2e-05" and rounded(float("nan")) == "nan"
    assert rounded(np.float32(0.5)) == "0.5" and rounded(np.array([0.5])) == "0.5"
    assert rounded([0.1, 0.2]) is None  # vectors are not printed


@pytest.fixture
def clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(progress_module.time, "time", lambda: now[0])
    return now


def test_lines_say_what_runs_then_step_rate_elapsed_eta_and_a_few_metrics(clock, capsys):
    p = Progress("MBPO on InvertedPendulum-v5", 10_000, every=1000, compiling="the SAC phase")
    first = capsys.readouterr().out.strip()
    assert first == ("MBPO on InvertedPendulum-v5: 10,000 env steps; a line every 1,000; "
                     "the first line waits for compiling the SAC phase")
    clock[0] += 100.0  # 1000 steps in 100 s, compilation included
    line = p.update(1000, {"eval/return": 118.456, "per_condition": [0.1, 0.2], "loss": 0.5}, ["eval/return",
                                                                                                "per_condition"])
    assert line == "step 1,000/10,000 (10%) | 10 sps | elapsed 1m40s | eta 15m00s | eval/return 118"
    clock[0] += 20.0  # then 1000 steps in 20 s: the rate after the first line, not the compile
    line = p.update(2000, {"eval/return": 1000.0})
    assert line.startswith("step 2,000/10,000 (20%) | 50 sps | elapsed 2m00s | eta 2m40s")
    assert "eval/return" not in line  # only what `show` names
    assert capsys.readouterr().out.splitlines() == [
        "step 1,000/10,000 (10%) | 10 sps | elapsed 1m40s | eta 15m00s | eval/return 118", line]
    assert p.done("eval/return", 1000.0, reference="1000 is the maximum") == (
        "done: eval/return 1,000 (1000 is the maximum) | 2,000 env steps in 2m00s")


def test_a_resumed_run_says_so_and_counts_its_rate_from_the_resume(clock):
    p = Progress("RL² on BernoulliBandit5-v0", 100, start=40, echo=False)
    clock[0] += 6.0
    assert p.update(70).startswith("step 70/100 (70%) | 5 sps | elapsed 6s | eta 6s")


def test_iteration_units_show_seconds_per_iteration(clock):
    p = Progress("GPS (lqr_flm) on Reacher-v5", 10, unit="iterations", echo=False)
    clock[0] += 12.0
    assert p.update(2).startswith("step 2/10 (20%) | 6 s/iteration | elapsed 12s | eta 48s")
