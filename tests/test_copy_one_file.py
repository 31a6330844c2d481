"""The copy-one-file use the README promises: `algos/<name>.py` plus `common/`,
copied into an empty folder, runs there on its own (no other algorithm file, no
benchmarks/, no tests/)."""

import shutil
import subprocess
import sys

import pytest
from cli import ROOT, algo_env

# A tiny run of each algorithm (seconds), with its own flags.
TINY = {
    "dyna_q": ["--total-timesteps", "200", "--eval-interval", "100", "--planning-steps", "2"],
    "rl2": ["--hidden-size", "8", "--meta-batch", "4", "--num-minibatches", "2", "--episodes-per-trial", "2",
            "--total-timesteps", "80", "--eval-interval", "80", "--eval-episodes", "2"],
    "gps": ["--env-id", "PointMass-v0", "--horizon", "8", "--num-samples", "2", "--conditions", "2",
            "--total-timesteps", "32", "--policy-steps", "5", "--gmm-iters", "2", "--prior-samples", "4",
            "--policy-hidden", "8", "--init-var", "1.0", "--policy-batch-size", "32"],
    "maml": ["--meta-batch", "2", "--trajectories-per-task", "2", "--total-timesteps", "800",
             "--eval-interval", "800", "--eval-episodes", "2", "--eval-trajectories", "2"],
    "backprop_through_model": ["--total-timesteps", "200", "--random-steps", "100", "--eval-interval", "100",
                               "--eval-episodes", "1", "--horizon", "5", "--num-start-states", "8",
                               "--policy-steps", "2", "--model-steps", "2", "--model-batch-size", "32",
                               "--model-hidden", "8", "--policy-hidden", "8"],
    "mbpo": ["--total-timesteps", "560", "--random-steps", "550", "--eval-interval", "280", "--eval-episodes", "1",
             "--rollout-batch-size", "250", "--model-max-epochs", "1", "--hidden", "8", "--model-hidden", "8",
             "--model-layers", "1", "--ensemble-size", "2", "--num-elites", "1", "--num-updates", "1",
             "--batch-size", "16"],
    "me_trpo": ["--horizon", "20", "--steps-per-iteration", "100", "--total-timesteps", "200", "--eval-interval",
                "100", "--eval-episodes", "1", "--model-hidden", "16", "--model-batch-size", "64",
                "--model-max-passes", "5", "--model-eval-every", "1", "--model-patience", "3", "--policy-hidden", "8",
                "--imagined-steps", "200", "--max-policy-iters", "4", "--check-every", "2", "--policy-patience", "2",
                "--validation-starts", "20", "--bptt-batch", "20"],
    "distillation": ["--phase", "teacher", "--total-timesteps", "128", "--eval-interval", "64", "--num-envs", "8",
                     "--teacher-channels", "2", "--teacher-hidden", "8", "--learning-starts", "32",
                     "--dqn-buffer-size", "256", "--dqn-batch-size", "8", "--eval-episodes", "2"],
    "mb_mpo": ["--horizon", "20", "--random-steps", "100", "--eval-episodes", "1", "--model-hidden", "16",
               "--model-batch-size", "64", "--model-max-epochs", "5", "--policy-hidden", "8", "--meta-batch", "5",
               "--trajectories-per-task", "4", "--meta-steps", "2", "--total-timesteps", "300"],
    "pearl": ["--net-size", "8", "--encoder-size", "8", "--n-train-tasks", "4", "--n-eval-tasks", "2", "--meta-batch",
              "2", "--batch-size", "8", "--embedding-batch-size", "8", "--num-tasks-sample", "2",
              "--num-initial-steps", "20", "--num-steps-prior", "20", "--num-extra-rl-steps", "20",
              "--num-train-steps", "2", "--num-iterations", "1"],
    "plato": ["--arm", "bc", "--mpc-horizon", "4", "--mpc-iters", "1", "--mpc-first-iters", "1", "--hidden", "8",
              "--episodes-per-iteration", "1", "--horizon", "10", "--total-timesteps", "10", "--grad-steps", "2",
              "--batch-size", "8", "--eval-episodes", "2"],
}


@pytest.mark.parametrize("name", sorted(TINY))
def test_one_file_and_common_run_alone(name, tmp_path):
    shutil.copy(ROOT / "algos" / f"{name}.py", tmp_path)
    shutil.copytree(ROOT / "common", tmp_path / "common", ignore=shutil.ignore_patterns("__pycache__"))
    env = algo_env(XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
    env.pop("PYTHONPATH")  # nothing from the repository but the copied files
    run = lambda *flags: subprocess.run([sys.executable, f"{name}.py", *flags], cwd=tmp_path, env=env,
                                        capture_output=True, text=True, timeout=300)
    res = run("--help")
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"usage: python {name}.py" in res.stdout and "--resume" in res.stdout
    res = run(*TINY[name])
    assert res.returncode == 0, res.stderr[-2000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "metrics.jsonl").read_text().strip() and (run_dir / "checkpoint.msgpack").exists()
