"""Test settings: one BLAS thread and a persistent JAX compilation cache, so
repeated runs (and CI) do not recompile the same programs; compiled programs are
freed after each test file; MuJoCo's log goes to a temporary folder, not to
MUJOCO_LOG.TXT in the repository."""

import gc
import os
import re
import tempfile

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("MUJOCO_GL", "egl")

import jax  # noqa: E402
import pytest  # noqa: E402

cache_dir = os.environ.get("JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/jax-compilation-cache"))
jax.config.update("jax_compilation_cache_dir", cache_dir)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

from common.command_line import mujoco_log_to  # noqa: E402

MUJOCO_LOG_DIR = tempfile.mkdtemp(prefix="mujoco_log_")
mujoco_log_to(MUJOCO_LOG_DIR)


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs_after_each_file():
    """Drop JAX's caches of compiled programs after each test file. XLA maps several memory regions for every
    executable it loads and never unmaps them while the executable lives; the whole suite in one process went
    past the kernel's vm.max_map_count (65530) and died in XLA (a segfault in compilation, an abort in
    deserialisation, at whichever test came next). Measured: about 45 new maps a second while tests compile."""
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture(autouse=True)
def _mujoco_log_stays_in_the_temp_folder():
    """A test that goes through cli() points MuJoCo's log at runs/ (relative): put it back, so that a later
    test compiling a MuJoCo model from the repository root does not write runs/MUJOCO_LOG.TXT there."""
    yield
    mujoco_log_to(MUJOCO_LOG_DIR)

# Tests that train for several seconds: the it-learns tests, kill -9 + resume, smoke
# runs through the real entry point and the one-file copies. `-m "not slow"` leaves them out.
SLOW = re.compile(r"it_learns|rl2_learns|kill|cli_smoke|reproduces|one_file_and_common_run_alone")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW.search(item.name):
            item.add_marker(pytest.mark.slow)
