"""Speed: our MBPO against mbrl-lib's (PyPI `mbrl==0.2.0`), side by side in one run.

Both run the configuration of mbrl-lib's `mbpo_halfcheetah` (its
`conf/overrides/mbpo_halfcheetah.yaml` and `conf/algorithm/mbpo.yaml`) on
HalfCheetah-v4, the newest version gymnasium 0.26 (which mbrl-lib needs) has; ours
runs the same -v4 env from gymnasium 1.4. Settings: 5000 initial steps, ensemble
of 7 Gaussian MLPs 4x200 (SiLU = swish), 5 elites, holdout 20 %, patience 5, model
batch 256, refit every 250 steps, 400 model rollouts per env step (100k per refit)
of length 1 (schedule [20, 150, 1, 1]), model buffer of one 1000-step epoch
(400k), SAC 2x512 (twin Q), batch 256, 10 updates per env step, all SAC data from
the model (real_data_ratio 0), target entropy -1, no termination in rollouts.
(Not speed-relevant differences: mbrl-lib's first 5000 steps act with its
untrained SAC policy, ours with uniform random actions; mbrl-lib's SAC starts at
alpha 0.2, ours at 1; model weight decay 1e-5 there, per layer as the paper here.)

Both sides run at the same time, each pinned to a core of its own
(`os.sched_setaffinity` before exec; `--cores`), so that they see the same load
from the rest of the machine; the load average is sampled during the run and
saved with the numbers. Thread settings alone did not hold our side to one core:
XLA still ran helper threads (an audit measured 1.44 CPU seconds per wall second
for ours), and `intra_op_parallelism_threads=1` without its `--` was silently
ignored (with it, XLA aborts on an unknown flag); only the pinning holds. Each
side's CPU seconds per wall second in its window is recorded as the check. The
primary ratio is process CPU seconds per 1000 env steps, wall time beside it.

Measured: windows of `--window` env steps, each holding one model fit, its batch
of rollouts and window x 10 SAC updates. mbrl-lib's window starts at its second fit
(on the first 5500 real transitions, after 5000 + 250 steps). Ours starts at its
third fit (also on 5500 transitions), so that XLA's compilations, including the
one for the holdout set's padded size at the second fit, are not counted; ours is
faster, so it goes on window after window until mbrl-lib's window is over, and
the windows of ours whose middle falls inside mbrl-lib's are summed
(`--ours-delay` starts ours later so that it gets there in time). Reported: wall
seconds and process CPU seconds per 1000 env steps, split into model training,
model rollouts and SAC updates; evaluation is excluded on both sides. Also: our
SAC updates per second against the CPU's measured float32 matmul throughput.

Run:
    python -m benchmarks.mbpo_speed --quick   # ours alone (no mbrl-lib), one window of 250 steps
    OPENBLAS_NUM_THREADS=1 python -m benchmarks.mbpo_speed --ours-delay 120 --save  # builds .peers/mbrl-venv
    OPENBLAS_NUM_THREADS=1 python -m benchmarks.mbpo_speed --ours-delay 60 --sac-hidden 256 --save  # variant

Writes mbpo_speed.json to benchmarks/out/ (with --save: benchmarks/results/).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from importlib.metadata import version
from pathlib import Path

from benchmarks import harness
from benchmarks.harness import load_results, save_results

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".peers" / "mbrl-venv"
RANDOM_STEPS, FIT_EVERY = 5000, 250
# No Eigen thread pool for XLA; the core it may use is set by the pinning (see the docstring).
XLA_ONE_THREAD = "--xla_cpu_multi_thread_eigen=false"

# Driver for mbrl-lib, run with the venv's python: our own timing code around its
# public functions (patched module attributes), stopping after the window.
MBRL_DRIVER = r'''
import json, os, sys, time, warnings
warnings.filterwarnings("ignore")
import numpy as np, torch, hydra, omegaconf
threads, window, skip_fits, out_path, conf_dir = (int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]),
                                                  sys.argv[4], sys.argv[5])
torch.set_num_threads(threads)
import mbrl.algorithms.mbpo as mbpo, mbrl.util.common as common, mbrl.util.env
from mbrl.third_party.pytorch_sac_pranz24.sac import SAC
T = {"model_train": 0.0, "rollouts": 0.0, "sac": 0.0, "sac_updates": 0, "eval": 0.0, "fit_seconds": [],
     "cpu": {"model_train": 0.0, "rollouts": 0.0, "sac": 0.0, "eval": 0.0}}
state = {"fits": 0, "start": None, "cpu0": None, "steps": 0}
class Stop(Exception): pass
def timed(fn, key):
    def wrapper(*a, **k):
        tic, cpu = time.perf_counter(), time.process_time()
        out = fn(*a, **k)
        dt, dcpu = time.perf_counter() - tic, time.process_time() - cpu
        if key == "model_train": T["fit_seconds"].append(dt)
        if state["start"] is not None:
            T[key] += dt
            T["cpu"][key] += dcpu
            if key == "sac": T["sac_updates"] += 1
        return out
    return wrapper
timed_train = timed(common.train_model_and_save_model_and_data, "model_train")
def train_model(*a, **k):
    state["fits"] += 1
    if state["fits"] == skip_fits + 1:
        T["real_rows_at_window_fit"] = len(a[3])
        state["start"], state["cpu0"] = time.perf_counter(), time.process_time()
        T["window_unix"] = [time.time(), None]
    return timed_train(*a, **k)
common.train_model_and_save_model_and_data = train_model
mbpo.rollout_model_and_populate_sac_buffer = timed(mbpo.rollout_model_and_populate_sac_buffer, "rollouts")
mbpo.episode_returns = timed(mbpo.episode_returns, "eval")
SAC.update_parameters = timed(SAC.update_parameters, "sac")
orig_step = common.step_env_and_add_to_buffer
def step(*a, **k):
    if state["start"] is not None:
        state["steps"] += 1
        if state["steps"] == window:  # the window: the fit's iteration + window - 1 more
            T["window_seconds"] = time.perf_counter() - state["start"] - T["eval"]
            T["window_cpu_seconds"] = time.process_time() - state["cpu0"] - T["cpu"]["eval"]
            T["window_unix"][1] = time.time()
            raise Stop
    return orig_step(*a, **k)
common.step_env_and_add_to_buffer = step
with hydra.initialize_config_dir(config_dir=conf_dir, version_base="1.1"):
    cfg = hydra.compose("main", overrides=["algorithm=mbpo", "overrides=mbpo_halfcheetah",
        "overrides.env=gym___HalfCheetah-v4", "device=cpu",
        "+algorithm.agent._recursive_=false", "+dynamics_model._recursive_=false", *sys.argv[6:]])
env, term_fn, reward_fn = mbrl.util.env.EnvHandler.make_env(cfg)
test_env, *_ = mbrl.util.env.EnvHandler.make_env(cfg)
T["config"] = omegaconf.OmegaConf.to_container(cfg, resolve=True)
T["torch_threads"] = torch.get_num_threads()
try:
    os.makedirs(out_path + ".work", exist_ok=True)
    mbpo.train(env, test_env, term_fn, cfg, silent=True, work_dir=out_path + ".work")
except Stop:
    pass
T["window_steps"] = window
json.dump(T, open(out_path, "w"))
'''

# Driver for ours: algos.mbpo's own entry point, with process CPU time added to
# each metrics row (evaluation's CPU time taken out) by wrapping two functions.
OURS_DRIVER = r'''
import sys, time
import tyro
from algos import mbpo
import jax
from common import ensembles
cpu = {"eval": 0.0, "model_train": 0.0, "rollouts": 0.0, "sac": 0.0}
def timed(fn, key):  # process CPU seconds of a phase (blocks on its result, as main does right after)
    def wrapper(*a, **k):
        tic = time.process_time(); out = jax.block_until_ready(fn(*a, **k)); cpu[key] += time.process_time() - tic
        return out
    return wrapper
orig_log = mbpo.Run.log
def log(self, metrics, step, echo=True):
    extra = {"time/process_cpu_no_eval": time.process_time() - cpu["eval"], "time/unix": time.time(),
             **{f"cpu/{k}": v for k, v in cpu.items()}}
    return orig_log(self, {**metrics, **extra}, step, echo)
mbpo.episode_returns, mbpo.Run.log = timed(mbpo.episode_returns, "eval"), log
ensembles.train = timed(ensembles.train, "model_train")
mbpo.rollout_phase = timed(mbpo.rollout_phase, "rollouts")
mbpo.sac_phase = timed(mbpo.sac_phase, "sac")
mbpo.main(tyro.cli(mbpo.Args, args=sys.argv[1:]))
'''


def build_venv() -> Path:
    """mbrl-lib 0.2.0 and the versions it needs (torch 2.13 CPU, gymnasium 0.26.3, mujoco 2.3.7, numpy < 2,
    hydra-core 1.3.2), in .peers/ (gitignored)."""
    py = VENV / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        pip = [str(py), "-m", "pip", "install", "-q"]
        subprocess.run(pip + ["torch==2.13.0"], check=True)
        subprocess.run(pip + ["mbrl==0.2.0", "gymnasium==0.26.3", "mujoco==2.3.7"], check=True)
        subprocess.run(pip + ["numpy<2", "hydra-core==1.3.2", "omegaconf==2.3.0"], check=True)
    return py


def mbrl_conf_dir(py: Path) -> str:
    """A copy of mbrl-lib's packaged conf/ whose main.yaml drops `action_optimizer`
    (the wheel lacks conf/action_optimizer/)."""
    src = subprocess.run([str(py), "-c", "import mbrl, os; print(os.path.dirname(mbrl.__file__))"],
                         capture_output=True, text=True, check=True).stdout.strip()
    dst = Path(tempfile.mkdtemp(prefix="mbrl_conf_")) / "conf"
    shutil.copytree(Path(src) / "examples" / "conf", dst)
    main = (dst / "main.yaml").read_text().replace("  - action_optimizer: cem\n", "")
    (dst / "main.yaml").write_text(main)
    return str(dst)


def pinned_to(core: int | None):
    """A preexec_fn that pins the child to `core` (None: not pinned)."""
    return None if core is None else (lambda: os.sched_setaffinity(0, {core}))


def run_mbrl(threads: int, window: int, hidden: int, seed: int = 1, core: int | None = None) -> dict:
    py = build_venv()
    out = Path(tempfile.mkdtemp(prefix="mbrl_speed_")) / "timings.json"
    driver = out.parent / "driver.py"
    driver.write_text(MBRL_DRIVER)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               OPENBLAS_NUM_THREADS=str(threads))
    # mbrl-lib's loop fits first after 5000 + 250 steps; its second fit sees 5500 rows.
    subprocess.run([str(py), str(driver), str(threads), str(window), "1", str(out), mbrl_conf_dir(py),
                    f"overrides.sac_hidden_size={hidden}", f"seed={seed}"], env=env,
                   check=True, cwd=out.parent, preexec_fn=pinned_to(core))
    return json.loads(out.read_text())


OURS_FLAGS = ["--env-id", "HalfCheetah-v4", "--random-steps", str(RANDOM_STEPS), "--num-updates", "10",
              "--batch-size", "256", "--lr", "3e-4", "--real-ratio", "0.0",
              "--rollout-batch-size", "100000", "--rollout-schedule", "20", "150", "1", "1", "--epoch-length", "1000",
              "--model-retain-epochs", "1", "--ensemble-size", "7", "--num-elites", "5", "--model-hidden", "200",
              "--model-layers", "4", "--model-lr", "1e-3", "--target-entropy", "-1",
              "--model-train-freq", str(FIT_EVERY), "--eval-interval", str(FIT_EVERY), "--eval-episodes", "1"]


def run_ours(threads: int, window: int, hidden: int, seed: int = 1, mbrl_done: threading.Event | None = None,
             mbrl_span: list | None = None, max_windows: int = 12, core: int | None = None) -> dict:
    """Ours in a subprocess (XLA's thread count is fixed at start), read from the
    cumulative `time/*` and `cpu/*` metrics logged every 250 steps. Its windows
    start at the row of step 5500 (the third fit comes at step 5501). With mbrl-lib
    running beside it, ours keeps going, window after window, until mbrl-lib's
    window has ended (then it is stopped), and the windows of ours whose middle
    falls inside mbrl-lib's window are summed: both sides measured under the same
    load. Alone: the first window."""
    tmp = Path(tempfile.mkdtemp(prefix="ours_speed_"))
    (tmp / "driver.py").write_text(OURS_DRIVER)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OPENBLAS_NUM_THREADS=str(threads))
    if threads == 1:
        env["XLA_FLAGS"] = XLA_ONE_THREAD
    start = RANDOM_STEPS + 2 * FIT_EVERY
    end = start + window * (1 if mbrl_done is None else max_windows)
    read_rows = lambda: [json.loads(line) for line in next(tmp.glob("runs/*/metrics.jsonl")).read_text().splitlines()]
    with open(tmp / "stdout.txt", "w") as log:
        proc = subprocess.Popen([sys.executable, "driver.py", *OURS_FLAGS, "--hidden", str(hidden),
                                 "--seed", str(seed), "--total-timesteps", str(end)], cwd=tmp, env=env, stdout=log,
                                preexec_fn=pinned_to(core))
        while proc.poll() is None:
            time.sleep(2)
            if mbrl_done is not None and mbrl_done.is_set():
                rows = read_rows() if list(tmp.glob("runs/*/metrics.jsonl")) else []
                if not mbrl_span or (rows and rows[-1].get("time/unix", 0) > mbrl_span[1] + 1):
                    proc.terminate()  # mbrl-lib's window is over (or it failed): enough
                    proc.wait()
                    break
        if proc.returncode not in (0, -15):
            raise RuntimeError(f"ours exited with {proc.returncode} (see {tmp / 'stdout.txt'})")
    rows = {r["global_step"]: r for r in read_rows()}
    windows = []
    for s0 in range(start, end, window):
        if s0 + window not in rows:
            break
        a, b = rows[s0], rows[s0 + window]
        d = lambda k, a=a, b=b: b[f"time/{k}"] - a[f"time/{k}"]
        windows.append({"model_train": d("model_train"), "rollouts": d("rollouts"), "sac": d("sac"),
                        "sac_updates": 10 * window, "window_seconds": (b["time"] - a["time"]) - d("eval"),
                        "window_cpu_seconds": d("process_cpu_no_eval"), "window_steps": window,
                        "real_rows_at_window_fit": s0, "window_unix": [a["time/unix"], b["time/unix"]],
                        "eval_return_at_end": b["eval/return"],
                        "cpu": {k: b[f"cpu/{k}"] - a[f"cpu/{k}"] for k in ("model_train", "rollouts", "sac", "eval")},
                        "model_epochs_at_window_fit": b.get("model/epochs")})
    chosen = windows[:1]
    if mbrl_span:
        inside = [w for w in windows if mbrl_span[0] <= sum(w["window_unix"]) / 2 <= mbrl_span[1]]
        chosen = inside or [min(windows, key=lambda w: abs(sum(w["window_unix"]) / 2 - sum(mbrl_span) / 2))]
    out = {k: sum(w[k] for w in chosen) for k in ("model_train", "rollouts", "sac", "sac_updates", "window_seconds",
                                                  "window_cpu_seconds", "window_steps")}
    out["cpu"] = {k: sum(w["cpu"][k] for w in chosen) for k in chosen[0]["cpu"]}
    out["window_unix"] = [chosen[0]["window_unix"][0], chosen[-1]["window_unix"][1]]
    out["windows_used"] = [w["real_rows_at_window_fit"] for w in chosen]
    out["all_windows"] = windows
    return out


def sac_flops_and_matmul_rate(threads: int, hidden: int) -> dict:
    """FLOPs of one of our SAC updates (XLA's cost analysis of `sac_update`, hidden
    512, batch 256, HalfCheetah's 17-d obs and 6-d actions) and this CPU's float32
    matmul throughput: a jitted loop of 256x256 @ 256x256 products, and one of the
    update's largest shape, 256x512 @ 512x512. The weights are all 1/n, so that the
    values stay 1 (no denormals)."""
    if threads == 1:
        os.environ["XLA_FLAGS"] = XLA_ONE_THREAD
    import jax
    import jax.numpy as jnp
    import numpy as np

    from algos import mbpo

    obs_dim, act_dim = 17, 6
    cfg = mbpo.Args(num_updates=1, batch_size=256, real_ratio=0.0, gamma=0.99, tau=5e-3, target_entropy=-1.0,
                    hidden=hidden, lr=3e-4)
    state = mbpo.create_sac(jax.random.PRNGKey(0), mbpo.Dims(obs_dim, act_dim), cfg)
    rng = np.random.default_rng(0)
    batch = dict(obs=rng.normal(size=(256, obs_dim)), action=rng.uniform(-1, 1, (256, act_dim)),
                 reward=rng.normal(size=256), next_obs=rng.normal(size=(256, obs_dim)), terminated=np.zeros(256))
    batch = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), batch)
    flops = harness.xla_flops(jax.jit(mbpo.sac_update, static_argnums=0), (cfg, state, batch, jax.random.PRNGKey(0)))
    # The same update alone, 100 in one lax.scan (no buffer sampling, no env).
    many = jax.jit(lambda s, k: jax.lax.scan(lambda s, k: (mbpo.sac_update(cfg, s, batch, k)[0], None), s,
                                             jax.random.split(k, 100))[0])
    jax.block_until_ready(many(state, jax.random.PRNGKey(1)))

    def best_of_3(fn):  # (wall, process CPU) seconds, the best of 3: the machine is shared
        out = []
        for _ in range(3):
            tic, cpu = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn())
            out.append((time.perf_counter() - tic, time.process_time() - cpu))
        return min(t for t, _ in out), min(c for _, c in out)

    wall, cpu = best_of_3(lambda: many(state, jax.random.PRNGKey(2)))
    isolated = {"per_wall_second": 100 / wall, "per_cpu_second": 100 / cpu}
    rates, rates_cpu = {}, {}
    for m, n, iters in ((256, 256, 2000), (256, 512, 500)):
        x, w = jnp.ones((m, n)), jnp.full((n, n), 1.0 / n)
        f = jax.jit(lambda x, w, iters=iters: jax.lax.fori_loop(0, iters, lambda i, x: x @ w, x))
        f(x, w).block_until_ready()
        wall, cpu = best_of_3(lambda f=f, x=x, w=w: f(x, w))
        rates[f"{m}x{n}@{n}x{n}"] = iters * 2 * m * n * n / wall
        rates_cpu[f"{m}x{n}@{n}x{n}"] = iters * 2 * m * n * n / cpu
    return {"sac_update_flops": flops, "matmul_flops_per_second": rates,
            "matmul_flops_per_cpu_second": rates_cpu, "isolated_sac_updates": isolated,
            "load_average_at_matmul": os.getloadavg()}


def window_load(loads, span):
    """Mean 1-minute load average of the samples taken in [start, end]."""
    inside = [row[1] for row in loads if span[0] <= row[0] <= span[1]]
    return sum(inside) / len(inside) if inside else None


def summarize(result: dict) -> list[dict]:
    """Ratios (per 1000 env steps: wall and process CPU seconds) into `result`, and
    its headline row."""
    o, m = result["ours_seconds_per_1000_steps"], result["mbrl_seconds_per_1000_steps"]
    ratio = m["window_seconds"] / o["window_seconds"]
    cpu_ratio = m["window_cpu_seconds"] / o["window_cpu_seconds"]
    result["speedup"], result["speedup_cpu_seconds"] = ratio, cpu_ratio
    loads = [v for v in (result.get("load_average_1min_during_window") or {}).values() if v is not None]
    loads = loads or [r[1] for r in result["load_average_samples"]]
    variant = "" if result.get("sac_hidden", 512) == 512 else f" but SAC 2x{result['sac_hidden']}"
    pinned = (", each pinned to its own core" if (result.get("pinned_cores") or {}).get("ours") is not None
              else ", NOT pinned")
    host = result.get("host") or result.get("machine") or {}
    pinned += f" on {host.get('cpu', 'a')} {host.get('cpu_family_model', '')} ({'/'.join(host.get('simd', []))})"
    print(f"speedup: {ratio:.2f}x wall, {cpu_ratio:.2f}x CPU seconds", flush=True)
    return [{"algorithm": "MBPO",
             "setting": f"HalfCheetah-v4, mbrl-lib's mbpo_halfcheetah config{variant}, {result['threads']} thread "
                        f"each, run side by side{pinned} (1-min load avg {sum(loads) / len(loads):.1f}); ours "
                        f"{cpu_ratio:.2f}x fewer process CPU seconds, {ratio:.2f}x less wall time",
             "metric": "process CPU seconds per 1000 env steps after learning starts",
             "ours": round(o["window_cpu_seconds"], 1),
             "reference": f"mbrl-lib 0.2.0: {m['window_cpu_seconds']:.1f} (ratio {cpu_ratio:.2f}x; wall seconds "
                          f"{m['window_seconds']:.1f} vs ours {o['window_seconds']:.1f}, {ratio:.2f}x)",
             "seeds": 1, "wall_seconds": round(result["run_wall_seconds"])}]


def resummarize() -> None:
    """Recompute ratios and headline rows of the stored record (main and variants)."""
    record = load_results("mbpo_speed")
    record.pop("benchmark"), record.pop("machine")
    headline = summarize(record)
    for variant in record.get("variants", {}).values():
        headline += summarize(variant)
    save_results("mbpo_speed", {**record, "headline": headline})


def main(argv=None):
    p = harness.parser("mbpo_speed", __doc__, seeds=[1], quick={"skip_mbrl": True},
                       seeds_help="the seed of both sides (one seed: the speed is measured once)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--window", type=int, default=250, help="env steps measured after learning starts")
    p.add_argument("--skip-mbrl", action="store_true")
    p.add_argument("--cores", type=int, nargs=2, default=None,
                   help="the cores ours and mbrl-lib are pinned to with --threads 1 (default: the first two this "
                        "process may use)")
    p.add_argument("--ours-delay", type=float, default=0.0,
                   help="seconds to wait before starting ours, so that the two windows overlap in time (mbrl-lib "
                        "takes longer to reach its window)")
    p.add_argument("--sac-hidden", type=int, default=512,
                   help="SAC width on both sides (512: mbrl-lib's config; any other value is stored as a variant "
                        "inside the existing mbpo_speed.json)")
    p.add_argument("--resummarize", action="store_true",
                   help="only recompute the ratios and headline rows of benchmarks/results/mbpo_speed.json")
    a = harness.parse(p, argv)
    if len(a.seeds) != 1:
        p.error("--seeds: the speed is measured with one seed")
    if a.resummarize:
        return resummarize()

    allowed = sorted(os.sched_getaffinity(0))
    cores = a.cores or (allowed * 2)[:2]
    if a.threads != 1:
        cores = [None, None]
    elif any(c not in allowed for c in cores):
        p.error(f"--cores: this process may use cores {allowed}, got {cores}")
    elif cores[0] == cores[1] and not a.skip_mbrl:
        print(f"warning: both sides on core {cores[0]} (a one-core machine?)", flush=True)

    loads, done = [], threading.Event()

    def sample_load():
        while not done.is_set():
            loads.append((round(time.time()), *os.getloadavg()))
            done.wait(15)

    results, errors = {}, []

    mbrl_done, mbrl_span = threading.Event(), []

    def worker(name, fn):
        try:
            if name == "ours":
                time.sleep(a.ours_delay)
                extra = {} if a.skip_mbrl else {"mbrl_done": mbrl_done, "mbrl_span": mbrl_span}
                results[name] = fn(a.threads, a.window, a.sac_hidden, a.seeds[0], core=cores[0], **extra)
            else:
                results[name] = fn(a.threads, a.window, a.sac_hidden, a.seeds[0], core=cores[1])
                mbrl_span.extend(results[name]["window_unix"])
            print(f"{name}:", {k: v for k, v in results[name].items() if k not in ("config", "all_windows")},
                  flush=True)
        except Exception as e:  # noqa: BLE001 - report and let the other side finish
            errors.append(f"{name}: {e!r}")
        finally:
            if name == "mbrl":
                mbrl_done.set()

    jobs = [("ours", run_ours)] + ([] if a.skip_mbrl else [("mbrl", run_mbrl)])
    threading.Thread(target=sample_load, daemon=True).start()
    t0 = time.time()
    threads = [threading.Thread(target=worker, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    if errors:
        sys.exit("; ".join(errors))
    ours, theirs = results["ours"], results.get("mbrl")
    if cores[0] is not None:  # the FLOP count and matmul rate on one core, as the runs had
        os.sched_setaffinity(0, {cores[0]})
    hw = sac_flops_and_matmul_rate(a.threads, a.sac_hidden)
    hw["matmul_2048_gflops_per_cpu_second"] = harness.matmul_rate(clock=time.process_time)

    keys = ("window_seconds", "window_cpu_seconds", "model_train", "rollouts", "sac")
    per1000 = lambda t: {**{k: 1000 * t[k] / t["window_steps"] for k in keys},
                         **{f"cpu_{k}": 1000 * t["cpu"][k] / t["window_steps"] for k in keys[2:]}}
    ours_rate = ours["sac_updates"] / ours["sac"]
    flops = hw["sac_update_flops"]
    result = {
        "env": f"HalfCheetah-v4 on both sides (gymnasium {version('gymnasium')} / mujoco {version('mujoco')} "
               "for ours; gymnasium 0.26.3 / mujoco 2.3.7 for mbrl-lib)",
        "config": "mbrl-lib mbpo_halfcheetah: 5000 initial steps, 7x(4x200 SiLU) Gaussian ensemble, 5 elites, "
                  "holdout 0.2, patience 5, model batch 256, refit every 250 steps, 400 rollouts/step of length 1, "
                  f"SAC 2x{a.sac_hidden}, batch 256, lr 3e-4, 10 updates/step, real_data_ratio 0, target entropy -1",
        "sac_hidden": a.sac_hidden, "ours_flags": [*OURS_FLAGS, "--hidden", str(a.sac_hidden)],
        "mbrl_overrides": "algorithm=mbpo overrides=mbpo_halfcheetah overrides.env=gym___HalfCheetah-v4 "
                          f"device=cpu seed={a.seeds[0]} overrides.sac_hidden_size={a.sac_hidden}",
        "threads": a.threads, "window_steps": a.window, "ours_delay_seconds": a.ours_delay,
        "pinned_cores": {"ours": cores[0], "mbrl": cores[1]}, "host": harness.machine(),
        # The check that each side was held to one core: CPU seconds per wall second in its window.
        "cpu_seconds_per_wall_second": {name: r["window_cpu_seconds"] / r["window_seconds"]
                                        for name, r in results.items()},
        "run_wall_seconds": time.time() - t0,
        "ours_seconds_per_1000_steps": per1000(ours), "ours_raw": ours,
        "mbrl_seconds_per_1000_steps": per1000(theirs) if theirs else None,
        "mbrl_raw": {k: v for k, v in theirs.items() if k != "config"} if theirs else None,
        "mbrl_config": theirs.get("config") if theirs else None,
        "ours_sac_updates_per_second": ours_rate,
        "mbrl_sac_updates_per_second": theirs["sac_updates"] / theirs["sac"] if theirs else None,
        **hw,
        "ours_sac_flops_per_second": ours_rate * flops,
        "ours_sac_fraction_of_matmul_rate": {k: ours_rate * flops / v for k, v in
                                             hw["matmul_flops_per_second"].items()},
        "ours_sac_updates_per_cpu_second": ours["sac_updates"] / ours["cpu"]["sac"],
        "mbrl_sac_updates_per_cpu_second": theirs["sac_updates"] / theirs["cpu"]["sac"] if theirs else None,
        "ours_sac_fraction_of_matmul_rate_cpu": {k: ours["sac_updates"] / ours["cpu"]["sac"] * flops / v
                                                 for k, v in hw["matmul_flops_per_cpu_second"].items()},
        "isolated_sac_fraction_of_matmul_rate_cpu": {k: hw["isolated_sac_updates"]["per_cpu_second"] * flops / v
                                                     for k, v in hw["matmul_flops_per_cpu_second"].items()},
        "load_average_samples": loads,
        "load_average_1min_during_window": {
            name: window_load(loads, r["window_unix"]) for name, r in results.items() if "window_unix" in r},
    }
    headline = summarize(result) if theirs else []
    if a.sac_hidden == 512:  # the main record; variants already stored are kept
        old = load_results("mbpo_speed") if (harness.RESULTS / "mbpo_speed.json").exists() else {}
        # Variants measured with both sides pinned are kept; older unpinned ones (and the record this run
        # replaces, if unpinned) move to "earlier_unpinned": kept for the record, not shown as results.
        pinned = lambda r: (r.get("pinned_cores") or {}).get("ours") is not None
        variants = {k: v for k, v in old.get("variants", {}).items() if pinned(v)}
        earlier = old.get("earlier_unpinned", {})
        earlier.update({k: v for k, v in old.get("variants", {}).items() if k not in variants})
        if old and not pinned(old):
            earlier["sac_512"] = {k: v for k, v in old.items() if k not in ("variants", "earlier_unpinned", "headline")}
        headline += [r for v in variants.values() for r in summarize(v)]
        extra = {"variants": variants} if variants else {}
        save_results("mbpo_speed", {**result, **extra, "earlier_unpinned": earlier, "headline": headline})
    else:  # a variant: added to the main record (its own fields and a second headline row)
        record = load_results("mbpo_speed")
        record.pop("benchmark"), record.pop("machine")
        date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        record.setdefault("variants", {})[f"sac_{a.sac_hidden}"] = {**result, "date": date}
        record["headline"] = [r for r in record["headline"] if "SAC 2x" not in r["setting"]] + headline
        save_results("mbpo_speed", record)


if __name__ == "__main__":
    main()
