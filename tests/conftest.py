"""Test setup: 8 fake CPU devices (before JAX is imported) and the repo root
on sys.path, so sharding code runs everywhere and tests see this checkout.

Compile time dominates the suite on CPU, so tests use XLA's backend
optimisation level 0 (about 30% faster here; results agree with the
default to rounding) and a compilation cache shared with the subprocess
tests of the same session. Set SSR_JAX_TEST_FULL_OPT=1 to test with XLA's
default optimisation.
"""

import os
import sys
import tempfile

_flags = os.environ.get("XLA_FLAGS", "")
if not os.environ.get("SSR_JAX_TEST_FULL_OPT"):
    _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (
    _flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      tempfile.mkdtemp(prefix="ssr_jax_test_jit_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Label/SLIC caches and the embedded world default to the user cache
# directory: the tests keep theirs out of ~/.cache.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="ssr_jax_test_xdg_")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Importing ssr_jax applies its XLA guard (ssr_jax/xla_guard.py) to
# XLA_FLAGS; do it here, before any test module can start a backend.
# SSR_JAX_XLA_GUARD=0 runs the suite without it (the regression tests in
# test_xla_guard.py and test_cam.py then fail on jaxlib 0.10.2).
import ssr_jax  # noqa: E402, F401
