"""The benchmark harness, the benchmarks' common command line and the README results table."""

import importlib
import json
from pathlib import Path

import matplotlib
import numpy as np
import pytest

from benchmarks import harness, report

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SCRIPTS = sorted(p.stem for p in Path(harness.ROOT).glob("*.py") if p.stem not in ("__init__", "harness", "report"))


def test_save_results_adds_provenance_and_report_builds_the_table(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "OUT_RESULTS", tmp_path)
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


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    """The committed results/plots folders and the scratch folder, in tmp_path."""
    d = {k: tmp_path / k for k in ("results", "plots", "scratch")}
    monkeypatch.setattr(harness, "RESULTS", d["results"])
    monkeypatch.setattr(harness, "PLOTS", d["plots"])
    monkeypatch.setattr(harness, "SCRATCH", d["scratch"])
    monkeypatch.setattr(harness, "OUT_RESULTS", d["scratch"])  # restored after the test: parse() sets them
    monkeypatch.setattr(harness, "OUT_PLOTS", d["scratch"])
    return d


def _save_both(name):
    fig, _ = plt.subplots()
    harness.save_figure(fig, name)
    plt.close(fig)
    return harness.save_results(name, {"x": 1})


def test_results_and_plots_go_to_the_scratch_folder_unless_save(dirs, tmp_path):
    p = harness.parser("demo", "Demo.", seeds=[1, 2])
    harness.parse(p, [])
    assert _save_both("a") == dirs["scratch"] / "a.json" and (dirs["scratch"] / "a.png").exists()
    assert not dirs["results"].exists() and not dirs["plots"].exists()
    assert harness.load_results("a")["x"] == 1

    harness.parse(harness.parser("demo", "Demo."), ["--out", str(tmp_path / "mine")])
    assert _save_both("b") == tmp_path / "mine" / "b.json" and (tmp_path / "mine" / "b.png").exists()

    harness.parse(harness.parser("demo", "Demo."), ["--save"])
    assert _save_both("c") == dirs["results"] / "c.json" and (dirs["plots"] / "c.png").exists()
    assert sorted(q.name for q in dirs["scratch"].iterdir()) == ["a.json", "a.png"]


def test_load_results_prefers_this_runs_output_then_the_committed_record(dirs):
    dirs["results"].mkdir()
    (dirs["results"] / "r.json").write_text(json.dumps({"which": "committed"}))
    harness.parse(harness.parser("demo", "Demo."), [])
    assert harness.load_results("r")["which"] == "committed"
    harness.save_results("r", {"which": "scratch"})
    assert harness.load_results("r")["which"] == "scratch"
    assert json.loads((dirs["results"] / "r.json").read_text())["which"] == "committed"  # untouched


def test_quick_swaps_in_small_settings_but_explicit_flags_win(dirs, capsys):
    def make():
        p = harness.parser("demo", "Demo.", seeds=[1, 2, 3], quick={"seeds": [1], "iterations": 3})
        p.add_argument("--iterations", type=int, default=100)
        return p

    a = harness.parse(make(), [])
    assert (a.seeds, a.iterations, a.quick, a.save) == ([1, 2, 3], 100, False, False)
    a = harness.parse(make(), ["--quick"])
    assert (a.seeds, a.iterations, a.quick) == ([1], 3, True)
    a = harness.parse(make(), ["--iterations", "7", "--quick", "--seeds", "4", "5"])
    assert (a.seeds, a.iterations) == ([4, 5], 7)
    assert "_quick" not in vars(a)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        harness.parse(make(), ["--quick", "--save"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("--quick results are not saved over the committed ones; drop --save (or --quick)")
    assert harness.OUT_RESULTS == dirs["scratch"]  # a refused --save moved nothing

    p = harness.parser("demo", "Demo.", quick={"iterations": 3})  # a quick value for a flag that is missing
    with pytest.raises(ValueError, match="iterations"):
        harness.parse(p, ["--quick"])


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_benchmark_has_the_common_cli_and_help_runs_nothing(name, dirs, capsys):
    module = importlib.import_module(f"benchmarks.{name}")
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m benchmarks.{name} ")
    for flag in ("--seeds", "--quick", "--save", "--out"):
        assert flag in out, flag
    assert module.__doc__.strip().splitlines()[0] in out  # the docstring is the help text
    assert f"python -m benchmarks.{name} --quick" in module.__doc__  # the docstring shows how to try it
    assert not dirs["scratch"].exists() and not dirs["results"].exists() and not dirs["plots"].exists()


def test_report_has_a_help_and_prints_the_table_without_writing(capsys, monkeypatch, tmp_path):
    with pytest.raises(SystemExit) as e:
        report.main(["--help"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("usage: python -m benchmarks.report")
    monkeypatch.setattr(report, "update_readme", lambda: pytest.fail("--print must not write README.md"))
    report.main(["--print"])
    assert capsys.readouterr().out.startswith("| algorithm | setting |")


@pytest.mark.parametrize("name, argv, files", [
    ("mbpo", ["--replot"], ["mbpo"]),
    ("gps", ["--replot", "--setting", "t50", "--iterations", "20"], ["gps_t50_20it"]),
    ("rl2", ["--replot", "--settings", "bandit-5-10"], ["rl2_bandit-5-10"]),
    ("maml", ["--replot"], ["maml_pointnav2d"]),
])
def test_replot_redraws_a_saved_record_into_the_scratch_folder(name, argv, files, dirs):
    committed = Path(harness.ROOT) / "results"
    dirs["results"].mkdir()
    for f in files:
        (dirs["results"] / f"{f}.json").write_text((committed / f"{f}.json").read_text())
    importlib.import_module(f"benchmarks.{name}").main(argv)
    assert sorted(p.name for p in dirs["scratch"].iterdir()) == [f"{f}.png" for f in files]
    assert not dirs["plots"].exists()
