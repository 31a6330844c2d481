"""Benchmark harness: the command line, settings grids, timing, JSON results, plots, README table.

Every benchmark script (benchmarks/<algo>.py) declares its command line here,
so that all of them behave alike:

    p = harness.parser("me_trpo", __doc__, seeds=[1, 2, 3], quick={"seeds": [1], "iterations": 5})
    p.add_argument("--iterations", type=int, default=100, help="...")
    a = harness.parse(p, argv)          # in main(argv=None)

`parser` adds --seeds, --quick, --save and --out; `--help` prints the module
docstring and exits before anything runs. `--quick` swaps in the `quick`
values (flags given explicitly still win). Results and plots go to a scratch
folder, benchmarks/out/ (git-ignored; --out DIR for another), unless `--save`
is given: then `save_results(name, payload)` writes benchmarks/results/<name>.json
(with the machine, date and git commit added) and `save_figure(fig, name)`
benchmarks/plots/<name>.png, the committed files. --quick with --save is
refused: a quick run never replaces a committed result.

A payload may carry `"headline"`: a list of rows

    {"algorithm": ..., "setting": ..., "metric": ..., "ours": ...,
     "reference": ..., "seeds": ..., "wall_seconds": ...}

which `python -m benchmarks.report` gathers into README.md's results table.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
PLOTS = ROOT / "plots"
SCRATCH = ROOT / "out"  # git-ignored
# Where save_results / save_figure write; parse() sets them (scratch unless --save).
OUT_RESULTS = SCRATCH
OUT_PLOTS = SCRATCH


def parser(name: str, doc: str | None, *, seeds: list[int] | None = None, quick: dict | None = None,
           seeds_help: str = "seeds to run, e.g. --seeds 1 2 3") -> argparse.ArgumentParser:
    """The common command line of `python -m benchmarks.<name>`: the module docstring
    as its help, --seeds (when `seeds`, the default list, is given), --quick (when
    `quick`, the flag values of a run of a few minutes, is given), --save and --out.
    Add the script's own flags to the parser it returns, then call `parse`."""
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    if seeds is not None:
        p.add_argument("--seeds", nargs="+", type=int, default=list(seeds), help=f"{seeds_help} (default: "
                       f"{' '.join(map(str, seeds))})")
    if quick is not None:
        shown = " ".join(f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list | tuple) else v}"
                         for k, v in quick.items())
        p.add_argument("--quick", action="store_true",
                       help=f"a small run of a few minutes, to try the script: {shown} (flags given "
                            "explicitly win); written to the scratch folder only")
        p.set_defaults(_quick=dict(quick))
    p.add_argument("--save", action="store_true",
                   help="write the committed benchmarks/results/*.json and benchmarks/plots/*.png (default: "
                        "the scratch folder --out)")
    p.add_argument("--out", type=Path, default=SCRATCH,
                   help="scratch folder for results and plots without --save (default: benchmarks/out/)")
    return p


def parse(p: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (`argv`, default sys.argv[1:]), apply --quick and
    point save_results / save_figure at the scratch folder or, with --save, at
    benchmarks/results/ and benchmarks/plots/."""
    global OUT_RESULTS, OUT_PLOTS
    a = p.parse_args(argv)
    quick = vars(a).pop("_quick", None)
    if getattr(a, "quick", False):
        unknown = sorted(set(quick) - set(vars(a)))
        if unknown:
            raise ValueError(f"quick settings for flags the parser lacks: {unknown}")
        p.set_defaults(**quick)  # defaults only: the flags given explicitly still win
        a = p.parse_args(argv)
        vars(a).pop("_quick", None)
        if a.save:
            p.error("--quick results are not saved over the committed ones; drop --save (or --quick)")
    OUT_RESULTS, OUT_PLOTS = (RESULTS, PLOTS) if a.save else (a.out, a.out)
    where = "benchmarks/results/ and benchmarks/plots/" if a.save else f"{_shown(a.out)} (scratch; --save " \
        "writes benchmarks/results/)"
    print(f"results go to {where}", flush=True)
    return a


def _shown(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(ROOT.parent))
    except ValueError:
        return str(path)


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

    cpu, info = platform.processor() or platform.machine(), {}
    try:  # the first processor's fields: "AMD EPYC" alone does not say Zen 3 (family 25) from Zen 5 (family 26)
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                info[key.strip()] = value.strip()
        cpu = info.get("model name", cpu)
    except OSError:
        pass
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in info.get("flags", "").split()]
    return {
        "cpu": cpu,
        "cpu_family_model": f"{info.get('cpu family', '?')}/{info.get('model', '?')}" if info else None,
        "simd": simd,
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
    """Write <name>.json, with machine, date and commit added, to the scratch folder
    or, after `parse` saw --save, to benchmarks/results/."""
    OUT_RESULTS.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": name,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "machine": machine(),
        **payload,
    }
    path = OUT_RESULTS / f"{name}.json"
    path.write_text(json.dumps(record, indent=1, default=_jsonable) + "\n")
    print(f"wrote {_shown(path)}", flush=True)
    return path


def load_results(name: str) -> dict:
    """The record <name>.json where save_results writes now if it is there (a
    scratch run's own result), else the committed one in benchmarks/results/."""
    path = OUT_RESULTS / f"{name}.json"
    return json.loads((path if path.exists() else RESULTS / f"{name}.json").read_text())


def _jsonable(x):
    if isinstance(x, Path):
        return str(x)
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
    """Write <name>.png to the scratch folder or, after --save, to benchmarks/plots/."""
    OUT_PLOTS.mkdir(parents=True, exist_ok=True)
    path = OUT_PLOTS / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    print(f"wrote {_shown(path)}", flush=True)
    return path


# ----------------------------------------------------------------------------
# Running an algorithm's script many times, each process pinned to one core
# ----------------------------------------------------------------------------
def as_flags(fields: dict) -> list[str]:
    """{"total_timesteps": 3000} -> ["--total-timesteps", "3000"]."""
    out = []
    for k, v in fields.items():
        out += [f"--{k.replace('_', '-')}", str(v)]
    return out


def launch_pinned(module: str, flags: list[str], core: int, workdir: Path) -> subprocess.Popen:
    """`python -m <module> <flags>` in workdir (its runs/ lands there, output in log.txt), one BLAS thread, pinned
    to the core-th allowed core, so that side-by-side runs do not share a core."""
    env = dict(os.environ, PYTHONPATH=str(ROOT.parent), OPENBLAS_NUM_THREADS="1",
               XLA_PYTHON_CLIENT_PREALLOCATE="false")
    workdir.mkdir(parents=True, exist_ok=True)
    log = open(workdir / "log.txt", "w")
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    pin = (lambda: os.sched_setaffinity(0, {cores[core % len(cores)]})) if cores else None
    return subprocess.Popen([sys.executable, "-m", module, *flags], cwd=workdir, env=env, stdout=log,
                            stderr=subprocess.STDOUT, preexec_fn=pin)


def read_curve(workdir: Path, keys: dict[str, str]) -> dict:
    """The run's metrics.jsonl as lists: "steps" and, for each name -> metric key in `keys`, its values."""
    files = list(Path(workdir).glob("runs/*/metrics.jsonl"))
    rows = [json.loads(line) for line in files[0].read_text().splitlines()] if files else []
    return {"steps": [r["global_step"] for r in rows], **{k: [r.get(v) for r in rows] for k, v in keys.items()}}


def run_pinned(jobs: dict, module: str, parallel: int, max_minutes: float | None, keys: dict[str, str],
               prefix: str, on_done=None) -> dict:
    """Run every job (name -> (flags, record)) as `python -m module`, `parallel` at a time on cores 0, 1, ...;
    a run still going after max_minutes is killed and keeps the curve it logged (partial). Returns name ->
    record + {"finished", "returncode", curve (read_curve), "log_tail"}; on_done(done) after every run."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    print(f"runs in {tmp} ({len(jobs)} jobs, {parallel} at a time)", flush=True)
    todo, running, done, free = list(jobs), {}, {}, list(range(parallel))
    while todo or running:
        while todo and free:
            name, core = todo.pop(0), free.pop(0)
            wd = tmp / "_".join(map(str, name if isinstance(name, tuple) else (name,)))
            running[name] = (launch_pinned(module, jobs[name][0], core, wd), time.time(), wd, core)
        time.sleep(2)
        for name, (proc, start, wd, core) in list(running.items()):
            over = max_minutes is not None and time.time() - start > 60 * max_minutes
            if proc.poll() is None and not over:
                continue
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            curve = read_curve(wd, keys)
            done[name] = {**jobs[name][1], "finished": proc.returncode == 0, "returncode": proc.returncode, **curve,
                          "log_tail": (wd / "log.txt").read_text()[-600:]}
            last = curve["eval_return"][-1] if curve.get("eval_return") else float("nan")
            print(f"{name}: {'done' if proc.returncode == 0 else 'stopped (partial)'} at step "
                  f"{curve['steps'][-1] if curve['steps'] else 0}, eval return {last:.1f}, "
                  f"{time.time() - start:.0f} s", flush=True)
            del running[name]
            free.append(core)
            if on_done is not None:
                on_done(done)
    return done


# ----------------------------------------------------------------------------
# Speed: FLOPs from layer sizes, timing a jitted call, this machine's matmul rate
# ----------------------------------------------------------------------------
def mlp_flops(sizes) -> float:
    """Multiply-adds x 2 of one forward pass of a dense net with these layer sizes, per row."""
    return 2.0 * sum(i * o for i, o in zip(sizes[:-1], sizes[1:], strict=False))


def timed_call(fn, args, reps: int, clock=time.perf_counter, **kwargs) -> float:
    """Seconds per call of fn(*args, **kwargs), compiled first, results waited for; `clock=time.process_time`
    gives CPU seconds (of the whole process), which other jobs on a shared core do not inflate."""
    import jax

    jax.block_until_ready(fn(*args, **kwargs))  # compile
    tic = clock()
    for _ in range(reps):
        jax.block_until_ready(fn(*args, **kwargs))
    return (clock() - tic) / reps


def matmul_rate(size: int = 2048, clock=time.perf_counter) -> float:
    """XLA's fp32 size x size matmul rate here, GFLOP/s (per CPU second with `clock=time.process_time`): the
    limit a compute-bound phase is held against."""
    import jax
    import jax.numpy as jnp

    x = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.float32)
    return 2 * size**3 / timed_call(jax.jit(lambda u: u @ u), (x,), 10, clock=clock) / 1e9


def layer_matmul_rate(rows: int, width: int, iters: int = 300, reps: int = 3, clock=time.process_time) -> float:
    """XLA's fp32 rate, GFLOP/s (per CPU second by default), of a phase's own matmul shape: a jitted loop of
    `iters` (rows x width) @ (width x width) products, the best of `reps`. The weights are all 1/width, so the
    values stay 1 (no denormals, no overflow)."""
    import jax
    import jax.numpy as jnp

    x, w = jnp.ones((rows, width)), jnp.full((width, width), 1.0 / width)
    loop = jax.jit(lambda x, w: jax.lax.fori_loop(0, iters, lambda i, x: x @ w, x))
    jax.block_until_ready(loop(x, w))  # compile
    best = float("inf")
    for _ in range(reps):
        tic = clock()
        jax.block_until_ready(loop(x, w))
        best = min(best, clock() - tic)
    return iters * 2 * rows * width * width / best / 1e9


def xla_flops(jitted, args) -> float:
    """FLOPs of one call of a jitted function by XLA's cost analysis of its compiled program. A loop's body is
    counted once, whatever its trip count: count a scanned phase from its parts."""
    cost = jitted.lower(*args).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def pin_to_core(index: int) -> int:
    """Pin this process to one of the cores it may use (`index` into them, modulo their number) before JAX starts
    its threads; returns the core. Thread settings alone do not hold XLA to one core (docs/speed.md)."""
    cores = sorted(os.sched_getaffinity(0))
    core = cores[index % len(cores)]
    os.sched_setaffinity(0, {core})
    return core
