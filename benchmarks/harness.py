"""Benchmark harness: settings grids, timing, JSON results, plots, README table.

Each benchmark script (benchmarks/<algo>.py) runs its paper's setting over
seeds, then calls `save_results(name, payload)`, which writes
`benchmarks/results/<name>.json` with the machine, date and git commit added.
A payload may carry `"headline"`: a list of rows

    {"algorithm": ..., "setting": ..., "metric": ..., "ours": ...,
     "reference": ..., "seeds": ..., "wall_seconds": ...}

which `python -m benchmarks.report` gathers into README.md's results table.
"""

from __future__ import annotations

import datetime
import itertools
import json
import os
import platform
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
PLOTS = ROOT / "plots"


def grid(**axes) -> list[dict]:
    """Every combination of the given settings: grid(n=[0, 5], env=["a"])
    -> [{"n": 0, "env": "a"}, {"n": 5, "env": "a"}]."""
    keys = list(axes)
    return [dict(zip(keys, values, strict=False)) for values in itertools.product(*axes.values())]


@contextmanager
def timer(out: dict, key: str = "wall_seconds"):
    """`with timer(d): ...` stores the elapsed wall seconds in d[key]."""
    start = time.perf_counter()
    try:
        yield out
    finally:
        out[key] = time.perf_counter() - start


@contextmanager
def scratch_dir():
    """`with scratch_dir(): algo.main(args)` runs in a temporary working
    directory, so the algorithm's runs/ folder stays out of the repository."""
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            yield tmp
        finally:
            os.chdir(cwd)


def machine() -> dict:
    """Where a number was measured: CPU, core count, JAX version and device."""
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "jax": jax.__version__,
        "device": str(jax.devices()[0].device_kind),
        "platform": jax.default_backend(),
    }


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def save_results(name: str, payload: dict) -> Path:
    """Write benchmarks/results/<name>.json with machine, date and commit added."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": name,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "machine": machine(),
        **payload,
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(record, indent=1, default=_jsonable) + "\n")
    print(f"wrote {path}")
    return path


def load_results(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


def _jsonable(x):
    if isinstance(x, np.ndarray | np.generic):
        return x.tolist()
    if hasattr(x, "__array__"):
        return np.asarray(x).tolist()
    raise TypeError(f"cannot write {type(x).__name__} as JSON")


def mean_and_stderr(values, axis: int = 0):
    """Mean and standard error of the mean over `axis` (e.g. over seeds)."""
    values = np.asarray(values, dtype=np.float64)
    n = values.shape[axis]
    se = values.std(axis=axis, ddof=1) / np.sqrt(n) if n > 1 else np.zeros_like(values.mean(axis))
    return values.mean(axis=axis), se


def final_mean_std(finals) -> dict:
    """{"final_mean", "final_std"} of per-seed final figures (sample std; 0 for one seed)."""
    finals = np.asarray(finals, dtype=np.float64)
    return {"final_mean": float(finals.mean()), "final_std": float(finals.std(ddof=1)) if len(finals) > 1 else 0.0}


def plot_curve(ax, x, runs, label: str, **kwargs):
    """Mean over runs (axis 0) with a one-standard-error band."""
    mean, se = mean_and_stderr(runs)
    (line,) = ax.plot(x, mean, label=label, **kwargs)
    ax.fill_between(x, mean - se, mean + se, color=line.get_color(), alpha=0.2, linewidth=0)
    return line


def save_figure(fig, name: str) -> Path:
    PLOTS.mkdir(parents=True, exist_ok=True)
    path = PLOTS / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    print(f"wrote {path}")
    return path
