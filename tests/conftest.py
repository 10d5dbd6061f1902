"""Test setup: 8 fake CPU devices (before JAX is imported) and the repo root
on sys.path, so sharding code runs everywhere and tests see this checkout.

Compile time dominates the suite on CPU, so tests use XLA's backend
optimisation level 0 (about 30% faster here; results agree with the
default to rounding) and a compilation cache shared with the subprocess
tests of the same session. Set SSR_JAX_TEST_FULL_OPT=1 to test with XLA's
default optimisation.

A plain `python -m pytest` (the README's and CI's command: no test paths)
runs on up to 4 pytest-xdist workers, `--dist worksteal`, with the test
modules that hold slow tests first; naming tests, `-n 0` or `-p no:xdist`
runs serially (see `pytest_cmdline_main` below).
"""

import os
import sys
import tempfile

import pytest

# pytest-xdist workers inherit the controller's environment, where this
# file has already run: add each flag once.
_flags = os.environ.get("XLA_FLAGS", "").split()
if not os.environ.get("SSR_JAX_TEST_FULL_OPT"):
    _flags.append("--xla_backend_optimization_level=0")
_flags.append("--xla_force_host_platform_device_count=8")
os.environ["XLA_FLAGS"] = " ".join(dict.fromkeys(_flags))
# Set in the controller before xdist starts its workers, so one cache
# serves the workers and their subprocesses.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      tempfile.mkdtemp(prefix="ssr_jax_test_jit_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Label/SLIC caches and the embedded world default to the user cache
# directory: the tests keep theirs out of ~/.cache (one per process, so
# xdist workers never share one).
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="ssr_jax_test_xdg_")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Importing ssr_jax applies its XLA guard (ssr_jax/xla_guard.py) to
# XLA_FLAGS; do it here, before any test module can start a backend.
# SSR_JAX_XLA_GUARD=0 runs the suite without it (the regression tests in
# test_xla_guard.py and test_cam.py then fail on jaxlib 0.10.2).
import ssr_jax  # noqa: E402, F401

# --- parallel runs (pytest-xdist) --------------------------------------------
MAX_WORKERS = 4


def default_workers() -> int:
    """Workers for a plain `python -m pytest`: one per core, at most
    MAX_WORKERS, none (serial) on one core. SSR_JAX_TEST_WORKERS=N
    overrides it (0 = serial).

    Bounded because every worker is a JAX process with 8 fake devices, its
    own XLA thread pool and compiled-code memory (~1-2 GB RSS), and many
    tests start JAX subprocesses of their own: more workers than that
    mostly add memory and compile-cache contention, while the wall time
    is bounded below by the longest test (~3 min,
    test_readme_embedded_commands) anyway."""
    env = os.environ.get("SSR_JAX_TEST_WORKERS", "").strip()
    if env:
        if not env.isdigit():
            raise pytest.UsageError(
                f"SSR_JAX_TEST_WORKERS={env!r}: expected a number of "
                "workers (0 runs the tests serially)")
        return int(env)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return min(MAX_WORKERS, cores) if cores > 1 else 0


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """`python -m pytest` with no test paths (README, .ci/run) runs on
    `default_workers()` xdist workers. Explicit test paths, `-n N` (`-n 0`
    for serial), `-p no:xdist` or an xdist worker itself are left alone:
    a targeted run does not pay the workers' start-up."""
    if (not config.pluginmanager.hasplugin("xdist")
            or hasattr(config, "workerinput")
            or config.option.numprocesses is not None
            or config.args_source != pytest.Config.ArgsSource.TESTPATHS
            or config.option.collectonly or config.option.usepdb):
        return
    workers = default_workers()
    if workers:
        config.option.numprocesses = workers
        if config.option.dist == "no":
            # Contiguous halves, then idle workers steal from the busiest
            # queue's tail: modules stay mostly on one worker (their
            # module-scoped fixtures are built once), and the tail balances.
            config.option.dist = "worksteal"


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Modules holding `@pytest.mark.slow` tests first (most slow tests
    first), each module kept contiguous and in its own order, so that no
    multi-minute test starts near the end of a parallel run. The order is
    a function of the collection alone, as xdist needs (every worker
    collects and must agree)."""
    module = {id(item): item.nodeid.split("::", 1)[0] for item in items}
    slow, first = {}, {}
    for i, item in enumerate(items):
        key = module[id(item)]
        first.setdefault(key, i)
        slow[key] = slow.get(key, 0) + (
            item.get_closest_marker("slow") is not None)
    items.sort(key=lambda item: (-slow[module[id(item)]],
                                 first[module[id(item)]]))
