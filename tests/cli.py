"""Run an algorithm's script the way a user does: `python -m algos.<name>`."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_algo(name: str, *flags: str, cwd, timeout: int = 300, **extra_env: str) -> subprocess.CompletedProcess:
    """`python -m algos.<name> <flags>` in `cwd` (its runs/ lands there), one BLAS
    thread, wandb off; returns the finished process (code, stdout, stderr)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": "1", "WANDB_MODE": "disabled",
           **extra_env}
    return subprocess.run([sys.executable, "-m", f"algos.{name}", *flags], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
