"""Test setup: 8 fake CPU devices (before JAX is imported) and the repo root
on sys.path, so sharding code runs everywhere and tests see this checkout.

Compile time dominates the suite on CPU, so tests use XLA's backend
optimisation level 0 (about 30% faster here; results agree with the
default to rounding) and a compilation cache shared with the subprocess
tests of the same session. Set SSR_JAX_TEST_FULL_OPT=1 to test with XLA's
default optimisation.

A plain `python -m pytest` (the README's and CI's command: no test paths)
runs on up to 4 pytest-xdist workers, `--dist worksteal`, each worker
starting on the heaviest test modules (`schedule_order` below); naming
tests, `-n 0` or `-p no:xdist` runs serially (see `pytest_cmdline_main`).
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
# The subprocesses (CLI runs, multi-process jobs) cache every compile:
# they mostly rerun programs another process of the session compiled
# (measured on the embedded README test, 2 loaded cores: 144 s vs 172 s
# with the 1 s threshold). The test processes themselves keep the 1 s
# threshold (`pytest_configure` below): writing each of their many
# small compiles costs more than it saves (test_cmpa + test_par: 58 s vs
# 53 s).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
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


def pytest_configure(config):
    """The test processes write only compiles of 1 s or more to the
    shared compilation cache (their subprocesses: every one, above)."""
    import jax  # noqa: PLC0415 - importing starts no backend

    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

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


# Scheduling weights, in seconds of one worker on 2 quiet cores: what a
# test marked `@pytest.mark.slow` costs unless its marker says
# (`@pytest.mark.slow(seconds=170)`, for the few longest), and what any
# other test costs. Only the order of the run depends on them.
SLOW_SECONDS = 30.0
FAST_SECONDS = 1.0


def _seconds(item) -> float:
    mark = item.get_closest_marker("slow")
    if mark is None:
        return FAST_SECONDS
    return float(mark.kwargs.get("seconds", SLOW_SECONDS))


def chunk_sizes(total: int, workers: int) -> list[int]:
    """How many of `total` tests each of `workers` idle workers is sent
    first by xdist's worksteal scheduler (3.8: in turn, the pending
    count // the workers left)."""
    sizes = []
    for k in range(workers):
        sizes.append(total // (workers - k))
        total -= sizes[-1]
    return sizes


def schedule_order(items, workers: int, seconds=_seconds) -> list:
    """The run order: whole modules, each in its own order.

    Modules holding slow tests ("heavy") come first, heaviest first (the
    sum of `seconds` over their tests). With `workers` > 1 under
    worksteal, which sends each worker a contiguous chunk of the list
    (`chunk_sizes`) and then lets idle workers steal the tail of the
    longest queue, the heavy modules are dealt to the chunks greedily
    (each to the chunk with the least heavy seconds so far, heaviest
    first) and each chunk is topped up with the fast modules: every worker
    starts on its heaviest module and the fast tests at the chunks' tails
    balance the end, so that no long test starts late. (The former order,
    heavy modules first in one list, gave them all to the first worker:
    the second started mid-list, and the longest test ran last.)"""
    modules: dict[str, list] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::", 1)[0], []).append(item)
    weight = {m: sum(map(seconds, its)) for m, its in modules.items()}
    heavy = sorted((m for m, its in modules.items()
                    if any(i.get_closest_marker("slow") for i in its)),
                   key=lambda m: -weight[m])
    light = [i for m, its in modules.items() if m not in heavy
             for i in its]
    if workers <= 1:
        return [i for m in heavy for i in modules[m]] + light
    bins: list[list[str]] = [[] for _ in range(workers)]
    load = [0.0] * workers
    for m in heavy:
        k = load.index(min(load))
        bins[k].append(m)
        load[k] += weight[m]
    out = []
    for k, size in enumerate(chunk_sizes(len(items), workers)):
        chunk = [i for m in bins[k] for i in modules[m]]
        fill = max(0, size - len(chunk))
        out += chunk + light[:fill]
        light = light[fill:]
    return out + light


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """(xdist, in the controller) Tells each worker the scheduler: workers
    parse the command line again, so they do not see the `--dist` that
    `pytest_cmdline_main` set."""
    node.workerinput["ssr_jax_dist"] = node.config.option.dist


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Orders the run (`schedule_order`): the heaviest modules first on
    every xdist worker. The order is a function of the collection and the
    number of workers alone, as xdist needs (every worker collects and
    must agree)."""
    worker = getattr(config, "workerinput", {})
    workers = 1
    if worker.get("ssr_jax_dist") == "worksteal":
        workers = int(worker["workercount"])
    items[:] = schedule_order(items, workers)
