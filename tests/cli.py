"""Run an algorithm's script the way a user does (`python -m algos.<name>`), kill
it, resume it, and feed it bad input; shared by the per-algorithm tests."""

import contextlib
import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from flax import serialization

ROOT = Path(__file__).resolve().parents[1]
# Keys whose values are wall-clock measurements, not results: never compared.
TIMING_KEY = re.compile(r"^time$|^time/|sps|second|_time$|timing")


def algo_env(**extra_env: str) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": "1", "WANDB_MODE": "disabled",
            **extra_env}


def run_algo(name: str, *flags: str, cwd, timeout: int = 300, **extra_env: str) -> subprocess.CompletedProcess:
    """`python -m algos.<name> <flags>` in `cwd` (its runs/ lands there), one BLAS
    thread, wandb off; returns the finished process (code, stdout, stderr)."""
    return subprocess.run([sys.executable, "-m", f"algos.{name}", *flags], cwd=cwd, env=algo_env(**extra_env),
                          capture_output=True, text=True, timeout=timeout)


def checkpoint_step(run_dir: Path) -> int | None:
    """The step of the run's checkpoint, or None if it has none yet."""
    path = Path(run_dir) / "checkpoint.msgpack"
    if not path.exists():
        return None
    return int(serialization.msgpack_restore(path.read_bytes())["run"]["step"])


def kill_after_checkpoint(name: str, *flags: str, cwd, min_step: int, timeout: int = 300, **extra_env: str):
    """Start the script, wait until its checkpoint has reached `min_step`, then
    `kill -9` it. Returns (run directory, step of the checkpoint it left)."""
    proc = subprocess.Popen([sys.executable, "-m", f"algos.{name}", *flags], cwd=cwd, env=algo_env(**extra_env),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            runs = list((Path(cwd) / "runs").glob("*/checkpoint.msgpack"))
            if runs and (checkpoint_step(runs[0].parent) or 0) >= min_step:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return runs[0].parent, checkpoint_step(runs[0].parent)
            if proc.poll() is not None:
                raise AssertionError(f"the run ended (code {proc.returncode}) before a checkpoint at step >= "
                                     f"{min_step}: {proc.stderr.read()[-2000:]}")
            time.sleep(0.05)
        raise AssertionError(f"no checkpoint at step >= {min_step} within {timeout} s")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def stopped_at_call(monkeypatch, module, name: str, n: int):
    """Inside the block, the n-th call of module.<name> raises KeyboardInterrupt: a run stopped mid-way in
    this process (the block expects the interrupt); the real function is back afterwards."""
    import pytest

    real, calls = getattr(module, name), []

    def stop(*a, **k):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(module, name, stop)
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        monkeypatch.setattr(module, name, real)


def comparable(rows: list[dict]) -> list[dict]:
    """Metric rows without their wall-clock fields."""
    return [{k: v for k, v in row.items() if not TIMING_KEY.search(k)} for row in rows]


def cli_error(module, *argv: str) -> str:
    """Run `module`'s command line in this process (`cli(module.Args, module.main)`,
    what `python -m` runs) and return its one-line error; fails the test if it
    did not stop, stopped with status 0, or printed anything on stderr."""
    from common.command_line import cli

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            cli(module.Args, module.main, argv=list(argv))
    except SystemExit as e:
        message = str(e.code)
        assert e.code not in (0, None), f"{argv}: exited with status 0"
        assert message.startswith("error: ") and "\n" not in message, f"{argv}: {message!r}"
        assert "Traceback" not in err.getvalue(), f"{argv}: {err.getvalue()}"
        return message
    raise AssertionError(f"{argv}: accepted")


def one_line_error(res: subprocess.CompletedProcess) -> str:
    """The one stderr line of a script that refused its input; fails the test if
    it exited 0, printed a traceback or more than one line."""
    lines = res.stderr.strip().splitlines()
    assert res.returncode != 0, "exited with status 0"
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr[-2000:]
    assert "Traceback" not in res.stderr + res.stdout, res.stderr[-2000:]
    return lines[0]
