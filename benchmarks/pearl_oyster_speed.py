"""Speed, side by side: one PEARL training iteration of ours (algos/pearl.py) and of the authors' oyster, at
oyster's point-robot configuration (configs/point-robot.json over configs/default.py: 5 tasks x (200 prior +
200 posterior RL-only) env steps, then 1000 gradient steps of 16 tasks x 256 transitions and 64 context
transitions, 3x300 networks, a 3x200 encoder, latent 5).

Both run at the same time, each pinned to its own core with one thread (torch.set_num_threads(1) for oyster, one
core for XLA), after an untimed warm-up: ours compiles and runs one iteration first; oyster makes its initial
collection (200 steps per training task). Then each times ONE training iteration (collection of the sampled
tasks + all gradient steps, no meta-test), in CPU seconds (the primary figure: a loaded host inflates the wall
time of both) and wall seconds, and this script writes the ratio. Oyster runs its own code, from a checkout of
katerakelly/oyster (--oyster-src) in its own virtual environment (--venv), never vendored: its MuJoCo and
rand_param_envs imports are avoided by loading only rlkit/envs/point_robot.py (the package's __init__ imports
every env module) and by an empty mujoco_py module (rlkit/envs/wrappers.py imports it). Setting up the venv
(../shared/PEERS.md): python -m venv .peers/oyster-venv; .peers/oyster-venv/bin/pip install torch==2.13.0
numpy==1.23.5 gym==0.23.1 click gtimer python-dateutil joblib; a checkout of oyster in .peers/oyster.

Run:
    python -m benchmarks.pearl_oyster_speed --quick     # 20 gradient steps on each side: tries the set-up
    python -m benchmarks.pearl_oyster_speed --save      # one full iteration each (oyster: about 9 minutes)

Writes pearl_oyster_speed.json to benchmarks/out/ (with --save: benchmarks/results/).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import harness

ROOT = Path(__file__).resolve().parents[1]

# Runs inside oyster's venv: builds oyster's agent and algorithm exactly as its launch_experiment.py does, makes
# the initial collection, then times one training iteration of its own MetaRLAlgorithm code.
RUNNER = r'''
import json, os, sys, time, types
src, out, train_steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
sys.path.insert(0, src)
import torch
torch.set_num_threads(1)
import numpy as np
pkg = types.ModuleType("rlkit.envs")  # rlkit/envs/__init__.py without its import of every (MuJoCo) env module
pkg.__path__ = [os.path.join(src, "rlkit", "envs")]
pkg.ENVS = {}
def register_env(name):
    def add(fn):
        pkg.ENVS[name] = fn
        return fn
    return add
pkg.register_env = register_env
sys.modules["rlkit.envs"] = pkg
sys.modules["mujoco_py"] = types.ModuleType("mujoco_py")  # imported by rlkit/envs/wrappers.py, unused here
import rlkit.envs.point_robot  # noqa
from configs.default import default_config
import launch_experiment as le
from rlkit.core.rl_algorithm import MetaRLAlgorithm
variant = le.deep_update_dict(json.load(open(os.path.join(src, "configs", "point-robot.json"))), default_config)
variant["util_params"]["use_gpu"] = False
variant["util_params"]["base_log_dir"] = os.path.join(out, "oyster_output")
if train_steps > 0:
    variant["algo_params"]["num_train_steps_per_itr"] = train_steps
result = {}
def timed_train(self):
    import gtimer as gt  # as MetaRLAlgorithm.train: collect_data stamps 'sample' on every call
    gt.reset()
    gt.set_def_unique(False)
    for idx in self.train_tasks:  # oyster's iteration-0 initial collection: untimed warm-up
        self.task_idx = idx
        self.env.reset_task(idx)
        self.collect_data(self.num_initial_steps, 1, np.inf)
    c0, t0 = time.process_time(), time.perf_counter()
    for i in range(self.num_tasks_sample):  # MetaRLAlgorithm.train's per-iteration collection
        idx = np.random.randint(len(self.train_tasks))
        self.task_idx = idx
        self.env.reset_task(idx)
        self.enc_replay_buffer.task_buffers[idx].clear()
        if self.num_steps_prior > 0:
            self.collect_data(self.num_steps_prior, 1, np.inf)
        if self.num_steps_posterior > 0:
            self.collect_data(self.num_steps_posterior, 1, self.update_post_train)
        if self.num_extra_rl_steps_posterior > 0:
            self.collect_data(self.num_extra_rl_steps_posterior, 1, self.update_post_train, add_to_enc_buffer=False)
    c1, t1 = time.process_time(), time.perf_counter()
    for _ in range(self.num_train_steps_per_itr):
        self._do_training(np.random.choice(self.train_tasks, self.meta_batch))
    c2, t2 = time.process_time(), time.perf_counter()
    result.update(cpu_seconds=c2 - c0, wall_seconds=t2 - t0, collect_cpu_seconds=c1 - c0,
                  train_cpu_seconds=c2 - c1, gradient_steps=self.num_train_steps_per_itr,
                  seconds_per_gradient_step=(t2 - t1) / self.num_train_steps_per_itr,
                  torch=torch.__version__, threads=torch.get_num_threads(), affinity=sorted(os.sched_getaffinity(0)))
MetaRLAlgorithm.train = timed_train
np.random.seed(0); torch.manual_seed(0)
le.experiment(variant)
json.dump(result, open(os.path.join(out, "oyster_speed.json"), "w"), indent=1)
print(json.dumps(result))
'''


def main(argv=None):
    p = harness.parser("pearl_oyster_speed", __doc__, seeds=[1], quick={"train_steps": 20})
    p.add_argument("--oyster-src", type=Path, default=ROOT / ".peers" / "oyster", help="a checkout of oyster")
    p.add_argument("--venv", type=Path, default=ROOT / ".peers" / "oyster-venv", help="oyster's virtual env")
    p.add_argument("--train-steps", type=int, default=0, help="gradient steps per iteration (0: oyster's 1000)")
    p.add_argument("--cores", type=int, nargs=2, default=[0, 1], help="the cores of ours and of oyster")
    a = harness.parse(p, argv)
    if not (a.oyster_src / "launch_experiment.py").exists() or not (a.venv / "bin" / "python").exists():
        sys.exit(f"error: needs oyster's checkout in {a.oyster_src} and its venv in {a.venv} (see --help)")
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"pearl_oyster_speed_{int(time.time())}"
    work.mkdir(parents=True)
    (work / "oyster_runner.py").write_text(RUNNER)
    cores = sorted(os.sched_getaffinity(0))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    oyster = subprocess.Popen([str(a.venv / "bin" / "python"), str(work / "oyster_runner.py"), str(a.oyster_src),
                               str(work), str(a.train_steps)], cwd=work, env=env,
                              stdout=open(work / "oyster_log.txt", "w"), stderr=subprocess.STDOUT,
                              preexec_fn=lambda: os.sched_setaffinity(0, {cores[a.cores[1] % len(cores)]}))
    ours_flags = ["--speed", "--out", str(work)] + ([f"--speed-train-steps={a.train_steps}"] if a.train_steps else [])
    ours = harness.launch_pinned("benchmarks.pearl", ours_flags, a.cores[0], work / "ours")
    print(f"running in {work}: ours on core {a.cores[0]}, oyster on core {a.cores[1]}", flush=True)
    codes = ours.wait(), oyster.wait()
    if any(codes):
        sys.exit(f"error: a side failed ({codes}); see {work}/ours/log.txt and {work}/oyster_log.txt")
    mine = json.loads((work / "pearl_speed.json").read_text())
    theirs = json.loads((work / "oyster_speed.json").read_text())
    res = {"config": mine["config"], "ours": mine, "oyster": theirs,
           "cpu_seconds_ratio": theirs["cpu_seconds"] / mine["iteration"]["cpu_seconds"],
           "wall_seconds_ratio": theirs["wall_seconds"] / mine["iteration"]["wall_seconds"],
           "matmul_gflop_per_s": mine["matmul_gflop_per_s"]}
    print(f"one training iteration: ours {mine['iteration']['cpu_seconds']:.1f} CPU s "
          f"({mine['iteration']['wall_seconds']:.1f} wall), oyster {theirs['cpu_seconds']:.1f} CPU s "
          f"({theirs['wall_seconds']:.1f} wall): {res['cpu_seconds_ratio']:.1f}x fewer CPU seconds "
          f"({res['wall_seconds_ratio']:.1f}x wall)", flush=True)
    harness.save_results("pearl_oyster_speed", res)
    return res


if __name__ == "__main__":
    main()
