"""Speed, side by side: MAML-TRPO meta-iterations of ours (algos/maml.py) and of learn2learn 0.2.0's
`examples/rl/maml_trpo.py`, at learn2learn's Particles2D configuration.

The configuration is learn2learn's example's (its `main()` defaults, one sampling worker as ../shared/PEERS.md
measured it): 20 tasks per meta-iteration, 20 episodes of 100 steps per task before and after one adaptation
step (80,000 env steps per meta-iteration), inner step 0.1, gamma 0.95, a 2x100 ReLU Gaussian policy, linear
baseline, TRPO with max KL 0.01, 10 CG iterations and a 15-step line search that halves the step. Ours runs
the same sizes on PointNav2D-v0 (the same task: goals in [-0.5, 0.5]^2, actions clipped to 0.1, reward minus
the distance) with `--inner-lr 0.1 --gamma 0.95 --backtrack-ratio 0.5`.

Both sides run at the same time, each pinned to its own core (`os.sched_setaffinity` before exec; torch with
one thread, XLA without its Eigen pool). learn2learn samples through a vector env with worker processes; they
inherit the pinning, and its CPU seconds are those of the whole process tree (from /proc), so that the work of
the workers is counted. Each side first runs untimed meta-iterations (ours: compilation), then times
`--iterations` meta-iterations: CPU seconds per meta-iteration is the primary ratio, wall beside it, and the
CPU seconds per wall second of each side is recorded as the check that each stayed on its core.

Set-up of learn2learn (../shared/PEERS.md): a venv in .peers/l2l-venv with torch==2.13.0, "numpy<2" scipy tqdm
requests gym==0.23.1 six dotmap "cython<3.1" setuptools wheel; learn2learn 0.2.0 from its sdist (cythonise
learn2learn/data/*.pyx, then pip install --no-deps --no-build-isolation .), cherry-rl==0.2.0 --no-deps; the
unpacked sdist (for examples/rl/) at --l2l-src. Its vision package (torchvision) is not imported: the driver
puts an empty module in its place.

Run:
    python -m benchmarks.maml_l2l_speed --quick    # 1 timed meta-iteration per side
    python -m benchmarks.maml_l2l_speed --save     # 3 timed meta-iterations per side (about 7 minutes)

Writes maml_l2l_speed.json to benchmarks/out/ (with --save: benchmarks/results/).
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import harness

ROOT = Path(__file__).resolve().parents[1]


def tree_cpu_seconds(pid: int) -> float:
    """utime + stime of a process and all its live descendants, from /proc."""
    tick, total, todo = os.sysconf("SC_CLK_TCK"), 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            pass
    return total


# Runs in learn2learn's venv: its example's main(), with the time of every "Iteration" line recorded (the line is
# printed after a meta-iteration's sampling, so successive lines are one whole meta-iteration apart).
L2L_RUNNER = r'''
import builtins, json, os, sys, time, types
src, out, iterations, warmup, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
sys.path.insert(0, os.path.join(src, "examples", "rl"))
sys.path.insert(0, os.path.dirname(out))
sys.modules["learn2learn.vision"] = types.ModuleType("learn2learn.vision")  # torchvision is not installed
import torch
torch.set_num_threads(1)
from tree_cpu import tree_cpu_seconds
import maml_trpo
marks = []
def mark(*a, **k):
    if a and a[0] == "\nIteration":
        marks.append((time.perf_counter(), tree_cpu_seconds(os.getpid()), time.process_time()))
        if len(marks) == warmup + iterations + 1:
            raise SystemExit(0)
maml_trpo.print = mark
maml_trpo.tqdm = lambda it, **k: it
try:
    maml_trpo.main(num_iterations=warmup + iterations + 1, num_workers=1, seed=seed)
except SystemExit:
    pass
a, b = marks[warmup], marks[-1]
json.dump({"iterations": len(marks) - 1 - warmup, "wall_seconds": b[0] - a[0], "cpu_seconds": b[1] - a[1],
           "main_process_cpu_seconds": b[2] - a[2], "torch_threads": torch.get_num_threads(),
           "affinity": sorted(os.sched_getaffinity(0)), "torch": torch.__version__}, open(out, "w"))
os._exit(0)  # the example's vector env is never closed: a normal exit waits on its threads forever
'''

# Runs in our venv: algos.maml's own main(), with every meta_iteration call timed (blocking on its result).
OURS_RUNNER = r'''
import json, os, sys, time
out, iterations, warmup, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
import jax
from algos import maml
times, real = [], maml.meta_iteration
def timed(*a, **k):
    t, c = time.perf_counter(), time.process_time()
    res = jax.block_until_ready(real(*a, **k))
    times.append((time.perf_counter() - t, time.process_time() - c))
    return res
maml.meta_iteration = timed
n = warmup + iterations
args = maml.Args(env_id="PointNav2D-v0", meta_batch=20, trajectories_per_task=20, inner_steps=1, inner_lr=0.1,
                 gamma=0.95, hidden_sizes=(100, 100), max_kl=0.01, cg_iters=10, backtrack_ratio=0.5,
                 backtrack_steps=15, total_timesteps=n * 80_000, eval_interval=10 ** 12, seed=seed)
t0 = time.perf_counter()
maml.main(args)
kept = times[warmup:]
json.dump({"iterations": len(kept), "wall_seconds": sum(t for t, _ in kept), "cpu_seconds": sum(c for _, c in kept),
           "first_iteration_wall_seconds": times[0][0], "affinity": sorted(os.sched_getaffinity(0)),
           "steps_per_iteration": 80_000, "jax": jax.__version__}, open(out, "w"))
'''


def main(argv=None):
    p = harness.parser("maml_l2l_speed", __doc__, seeds=[1], quick={"iterations": 1},
                       seeds_help="the seed of both sides (one seed: the speed is measured once)")
    p.add_argument("--iterations", type=int, default=3, help="timed meta-iterations per side")
    p.add_argument("--warmup", type=int, default=1, help="untimed meta-iterations first (ours: compilation)")
    p.add_argument("--l2l-src", type=Path, default=ROOT / ".peers" / "learn2learn-0.2.0",
                   help="the unpacked learn2learn 0.2.0 sdist (for examples/rl/)")
    p.add_argument("--venv", type=Path, default=ROOT / ".peers" / "l2l-venv", help="learn2learn's virtual env")
    p.add_argument("--cores", type=int, nargs=2, default=[0, 1], help="the cores of ours and of learn2learn")
    p.add_argument("--collect", type=Path, default=None,
                   help="only summarise the work folder of an earlier run whose sides both wrote their timings")
    a = harness.parse(p, argv)
    if a.collect:
        return summarise(a.collect, json.loads((a.collect / "run.json").read_text()))
    if not (a.l2l_src / "examples" / "rl" / "maml_trpo.py").exists() or not (a.venv / "bin" / "python").exists():
        sys.exit(f"error: needs learn2learn's sdist in {a.l2l_src} and its venv in {a.venv} (see --help)")
    allowed = sorted(os.sched_getaffinity(0))
    core = {side: allowed[c % len(allowed)] for side, c in zip(("ours", "l2l"), a.cores, strict=True)}
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"maml_l2l_speed_{int(time.time())}"
    work.mkdir(parents=True)
    (work / "l2l_runner.py").write_text(L2L_RUNNER)
    (work / "ours_runner.py").write_text(OURS_RUNNER)
    (work / "tree_cpu.py").write_text(f"import os\nfrom pathlib import Path\n\n\n{inspect.getsource(tree_cpu_seconds)}")
    pin = lambda c: (lambda: os.sched_setaffinity(0, {c}))
    threads = dict(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    l2l_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | threads
    ours_env = dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS="--xla_cpu_multi_thread_eigen=false",
                    WANDB_MODE="disabled", **threads)
    seed, n, w = str(a.seeds[0]), str(a.iterations), str(a.warmup)
    procs = {
        "l2l": subprocess.Popen([str(a.venv / "bin" / "python"), str(work / "l2l_runner.py"), str(a.l2l_src),
                                 str(work / "l2l.json"), n, w, seed], cwd=work, env=l2l_env,
                                stdout=open(work / "l2l_log.txt", "w"), stderr=subprocess.STDOUT,
                                preexec_fn=pin(core["l2l"])),
        "ours": subprocess.Popen([sys.executable, str(work / "ours_runner.py"), str(work / "ours.json"), n, w, seed],
                                 cwd=work, env=ours_env, stdout=open(work / "ours_log.txt", "w"),
                                 stderr=subprocess.STDOUT, preexec_fn=pin(core["ours"])),
    }
    print(f"running in {work}: ours on core {core['ours']}, learn2learn on core {core['l2l']}", flush=True)
    run = {"pinned_cores": core, "loads": [], "started": time.time()}
    while any(pr.poll() is None for pr in procs.values()):
        run["loads"].append(os.getloadavg()[0])
        run["ended"] = time.time()
        (work / "run.json").write_text(json.dumps(run))  # what --collect needs, should this process be stopped
        time.sleep(5)
    if any(pr.returncode for pr in procs.values()):
        sys.exit(f"error: a side failed ({ {k: pr.returncode for k, pr in procs.items()} }); see {work}/*_log.txt")
    return summarise(work, run)


def summarise(work: Path, run: dict) -> dict:
    """Ratios and the headline row from the two sides' timings in `work`; the matmul rate measured now, on the
    core ours ran on."""
    core, loads, t0 = run["pinned_cores"], run["loads"], run["started"]
    sides = {k: json.loads((work / f"{k}.json").read_text()) for k in ("ours", "l2l")}
    per_it = {k: {"cpu_seconds": s["cpu_seconds"] / s["iterations"],
                  "wall_seconds": s["wall_seconds"] / s["iterations"],
                  "cpu_seconds_per_wall_second": s["cpu_seconds"] / s["wall_seconds"]} for k, s in sides.items()}
    ratio_cpu = per_it["l2l"]["cpu_seconds"] / per_it["ours"]["cpu_seconds"]
    ratio_wall = per_it["l2l"]["wall_seconds"] / per_it["ours"]["wall_seconds"]
    if core["ours"] is not None:
        os.sched_setaffinity(0, {core["ours"]})
    rate = harness.matmul_rate(clock=time.process_time)  # per CPU second: the core is shared
    host = harness.machine()
    print(f"per meta-iteration: ours {per_it['ours']['cpu_seconds']:.1f} CPU s ({per_it['ours']['wall_seconds']:.1f} "
          f"wall), learn2learn {per_it['l2l']['cpu_seconds']:.1f} CPU s ({per_it['l2l']['wall_seconds']:.1f} wall): "
          f"{ratio_cpu:.1f}x fewer CPU seconds ({ratio_wall:.1f}x wall)", flush=True)
    mean_load = sum(loads) / len(loads) if loads else None
    load_text = f"1-min load avg {mean_load:.1f}" if loads else "load not sampled"
    res = {"config": "learn2learn examples/rl/maml_trpo.py defaults on Particles2D-v1 (ours: PointNav2D-v0): 20 "
                     "tasks x 20 episodes x 100 steps before and after 1 adaptation step, inner lr 0.1, gamma 0.95, "
                     "2x100 ReLU, TRPO max KL 0.01, CG 10, line search 15 x 0.5; 1 sampling worker",
           "pinned_cores": core, "per_iteration": per_it, "sides": sides, "cpu_seconds_ratio": ratio_cpu,
           "wall_seconds_ratio": ratio_wall, "matmul_2048_gflops_per_cpu_second": rate, "host": host,
           "load_average_1min_mean": mean_load, "run_note": run.get("note"), "run_wall_seconds": run["ended"] - t0,
           "headline": [{"algorithm": "MAML", "setting": f"Particles2D / PointNav2D-v0, learn2learn's maml_trpo "
                         f"example config, side by side, each pinned to its own core on {host['cpu']} "
                         f"{host['cpu_family_model']} ({load_text}); ours {ratio_cpu:.2f}x "
                         f"fewer process-tree CPU seconds, {ratio_wall:.2f}x less wall time",
                         "metric": "CPU seconds per meta-iteration (80,000 env steps)",
                         "ours": round(per_it["ours"]["cpu_seconds"], 2),
                         "reference": f"learn2learn 0.2.0: {per_it['l2l']['cpu_seconds']:.1f} (ratio "
                                      f"{ratio_cpu:.2f}x; wall {per_it['l2l']['wall_seconds']:.1f} vs ours "
                                      f"{per_it['ours']['wall_seconds']:.1f})",
                         "seeds": 1, "wall_seconds": round(run["ended"] - t0)}]}
    harness.save_results("maml_l2l_speed", res)
    return res


if __name__ == "__main__":
    main()
