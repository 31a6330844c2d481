"""Speed: our MBPO against mbrl-lib's (PyPI `mbrl==0.2.0`), side by side in one run.

Both run the configuration of mbrl-lib's `mbpo_halfcheetah` on HalfCheetah-v4 (the
newest version gymnasium 0.26, which mbrl-lib needs, has; ours runs the same -v4
env from gymnasium 1.4): 5000 initial steps, ensemble of 7 Gaussian MLPs 4x200
(SiLU = swish), 5 elites, refit every 250 steps, 400 model rollouts per env step
(100k per refit) of length 1, SAC 2x512, batch 256, 10 updates per env step, all
SAC data from the model (real_data_ratio 0), target entropy -1. Both use the same
number of CPU threads (--threads: torch.set_num_threads and XLA's intra-op
threads).

Measured: wall seconds of a window of `--window` env steps right after learning
starts (one model fit, one batch of rollouts and window x 10 SAC updates), split
into model training, model rollouts and SAC updates, scaled to 1000 env steps.
mbrl-lib's window starts at its first model fit; ours at its second (steps
5251-5500), so that XLA's one-off compilation is not counted. Evaluation time is
excluded on both sides. Also: our SAC updates per second against the measured
matmul throughput of this CPU.

    OPENBLAS_NUM_THREADS=1 python -m benchmarks.mbpo_speed            # builds .peers/mbrl-venv if missing

Writes benchmarks/results/mbpo_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness import save_results

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".peers" / "mbrl-venv"

# Driver for mbrl-lib, run with the venv's python: our own timing code around its
# public functions (patched module attributes), stopping after the window.
MBRL_DRIVER = r'''
import json, sys, time, warnings
warnings.filterwarnings("ignore")
import numpy as np, torch, hydra, omegaconf
threads, window, out_path, conf_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
torch.set_num_threads(threads)
import mbrl.algorithms.mbpo as mbpo, mbrl.util.common as common, mbrl.util.env
from mbrl.third_party.pytorch_sac_pranz24.sac import SAC
T = {"model_train": 0.0, "rollouts": 0.0, "sac": 0.0, "sac_updates": 0, "eval": 0.0}
state = {"start": None, "steps": 0}
class Stop(Exception): pass
def timed(fn, key):
    def wrapper(*a, **k):
        tic = time.perf_counter(); out = fn(*a, **k)
        if state["start"] is not None or key == "model_train":
            T[key] += time.perf_counter() - tic
            if key == "sac": T["sac_updates"] += 1
        return out
    return wrapper
orig_train = common.train_model_and_save_model_and_data
def train_model(*a, **k):
    if state["start"] is None: state["start"] = time.perf_counter()
    return timed(orig_train, "model_train")(*a, **k)
common.train_model_and_save_model_and_data = train_model
mbpo.rollout_model_and_populate_sac_buffer = timed(mbpo.rollout_model_and_populate_sac_buffer, "rollouts")
mbpo.evaluate = timed(mbpo.evaluate, "eval")
SAC.update_parameters = timed(SAC.update_parameters, "sac")
orig_step = common.step_env_and_add_to_buffer
def step(*a, **k):
    if state["start"] is not None:
        state["steps"] += 1
        if state["steps"] > window:
            T["window_seconds"] = time.perf_counter() - state["start"] - T["eval"]
            raise Stop
    return orig_step(*a, **k)
common.step_env_and_add_to_buffer = step
with hydra.initialize_config_dir(config_dir=conf_dir, version_base="1.1"):
    cfg = hydra.compose("main", overrides=["algorithm=mbpo", "overrides=mbpo_halfcheetah",
        "overrides.env=gym___HalfCheetah-v4", "device=cpu", "seed=1",
        "+algorithm.agent._recursive_=false", "+dynamics_model._recursive_=false"])
env, term_fn, reward_fn = mbrl.util.env.EnvHandler.make_env(cfg)
test_env, *_ = mbrl.util.env.EnvHandler.make_env(cfg)
try:
    mbpo.train(env, test_env, term_fn, cfg, silent=True, work_dir=out_path + ".work")
except Stop:
    pass
T["window_steps"] = window
json.dump(T, open(out_path, "w"))
'''


def build_venv() -> Path:
    """The recipe of ../shared/PEERS.md, in .peers/ (gitignored)."""
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
    import shutil

    dst = Path(tempfile.mkdtemp(prefix="mbrl_conf_")) / "conf"
    shutil.copytree(Path(src) / "examples" / "conf", dst)
    main = (dst / "main.yaml").read_text().replace("  - action_optimizer: cem\n", "")
    (dst / "main.yaml").write_text(main)
    return str(dst)


def run_mbrl(threads: int, window: int) -> dict:
    py = build_venv()
    out = Path(tempfile.mkdtemp(prefix="mbrl_speed_")) / "timings.json"
    driver = out.parent / "driver.py"
    driver.write_text(MBRL_DRIVER)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    subprocess.run([str(py), str(driver), str(threads), str(window), str(out), mbrl_conf_dir(py)], env=env,
                   check=True, cwd=out.parent)
    return json.loads(out.read_text())


OURS_FLAGS = ["--env-id", "HalfCheetah-v4", "--random-steps", "5000", "--hidden", "512", "--num-updates", "10",
              "--real-ratio", "0.0", "--rollout-batch-size", "100000", "--rollout-schedule", "20", "150", "1", "1",
              "--target-entropy", "-1", "--model-train-freq", "250", "--eval-interval", "250", "--eval-episodes", "1"]


def run_ours(threads: int, window: int) -> dict:
    """Ours in a subprocess (XLA's thread count is fixed at start). The window is
    read from the cumulative `time/*` metrics logged every 250 steps."""
    tmp = Path(tempfile.mkdtemp(prefix="ours_speed_"))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if threads == 1:
        env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    start, end = 5250, 5250 + window
    subprocess.run([sys.executable, "-m", "algos.mbpo", *OURS_FLAGS, "--total-timesteps", str(end)], cwd=tmp,
                   env=env, check=True, stdout=subprocess.DEVNULL)
    rows = {r["global_step"]: r for r in map(json.loads, next(tmp.glob("runs/*/metrics.jsonl")).read_text()
                                              .splitlines())}
    a, b = rows[start], rows[end]
    d = lambda k: b[f"time/{k}"] - a[f"time/{k}"]
    return {"model_train": d("model_train"), "rollouts": d("rollouts"), "sac": d("sac"),
            "sac_updates": 10 * window, "window_seconds": (b["time"] - a["time"]) - d("eval"), "window_steps": window}


def sac_flops_and_matmul_rate(threads: int) -> dict:
    """FLOPs of one of our SAC updates (XLA's cost analysis) and the CPU's f32 matmul
    throughput on the update's largest shape (256 x 512 @ 512 x 512)."""
    if threads == 1:
        os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    import jax
    import jax.numpy as jnp
    import numpy as np

    from algos import mbpo

    obs_dim, act_dim = 17, 6
    cfg = mbpo.SACConfig(1, 256, 0, 0.99, 5e-3, -1.0, 512, act_dim)
    state = mbpo.create_sac(jax.random.PRNGKey(0), obs_dim, cfg, 3e-4)
    rng = np.random.default_rng(0)
    batch = dict(obs=rng.normal(size=(256, obs_dim)), action=rng.uniform(-1, 1, (256, act_dim)),
                 reward=rng.normal(size=256), next_obs=rng.normal(size=(256, obs_dim)), terminated=np.zeros(256))
    batch = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), batch)
    compiled = jax.jit(mbpo.sac_update, static_argnums=0).lower(cfg, state, batch, jax.random.PRNGKey(0)).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    x, w = jnp.ones((256, 512)), jnp.ones((512, 512)) * 1e-3
    f = jax.jit(lambda x, w: jax.lax.fori_loop(0, 200, lambda i, x: jnp.tanh(x @ w), x))
    f(x, w).block_until_ready()
    tic = time.perf_counter()
    f(x, w).block_until_ready()
    rate = 200 * 2 * 256 * 512 * 512 / (time.perf_counter() - tic)
    return {"sac_update_flops": float(cost["flops"]), "matmul_flops_per_second": rate}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--window", type=int, default=250, help="env steps measured after learning starts")
    p.add_argument("--skip-mbrl", action="store_true")
    a = p.parse_args()
    ours = run_ours(a.threads, a.window)
    print("ours:", ours, flush=True)
    theirs = None if a.skip_mbrl else run_mbrl(a.threads, a.window)
    print("mbrl-lib:", theirs, flush=True)
    hw = sac_flops_and_matmul_rate(a.threads)
    keys = ("window_seconds", "model_train", "rollouts", "sac")
    per1000 = lambda t: {k: 1000 * t[k] / t["window_steps"] for k in keys}
    ours_rate = ours["sac_updates"] / ours["sac"]
    result = {
        "env": "HalfCheetah-v4 (gymnasium 1.4.0 / mujoco 4.0.0 for ours; gymnasium 0.26.3 / mujoco 2.3.7 for mbrl-lib)",
        "config": "mbrl-lib mbpo_halfcheetah: 5000 initial steps, 7x(4x200 SiLU) Gaussian ensemble, 5 elites, "
                  "refit every 250 steps, 400 rollouts/step of length 1, SAC 2x512, batch 256, 10 updates/step, "
                  "real_data_ratio 0",
        "threads": a.threads, "window_steps": a.window,
        "ours_seconds_per_1000_steps": per1000(ours), "ours_raw": ours,
        "mbrl_seconds_per_1000_steps": per1000(theirs) if theirs else None, "mbrl_raw": theirs,
        "ours_sac_updates_per_second": ours_rate,
        "mbrl_sac_updates_per_second": theirs["sac_updates"] / theirs["sac"] if theirs else None,
        **hw, "ours_sac_fraction_of_matmul_peak": ours_rate * hw["sac_update_flops"] / hw["matmul_flops_per_second"],
        "load_average_at_end": os.getloadavg(),
    }
    headline = []
    if theirs:
        ratio = result["mbrl_seconds_per_1000_steps"]["window_seconds"] / result["ours_seconds_per_1000_steps"][
            "window_seconds"]
        result["speedup"] = ratio
        headline.append({"algorithm": "MBPO", "setting": f"HalfCheetah-v4, mbrl-lib's config, {a.threads} thread",
                         "metric": "seconds per 1000 env steps after learning starts (ours vs mbrl-lib)",
                         "ours": round(result["ours_seconds_per_1000_steps"]["window_seconds"], 1),
                         "reference": round(result["mbrl_seconds_per_1000_steps"]["window_seconds"], 1),
                         "seeds": 1, "wall_seconds": None})
        print(f"speedup: {ratio:.2f}x", flush=True)
    save_results("mbpo_speed", {**result, "headline": headline})


if __name__ == "__main__":
    main()
