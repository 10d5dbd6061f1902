"""Guard against an XLA:CPU miscompile of jit(vmap(vjp)) through LayerNorm.

jaxlib 0.10.2's CPU compiler turns the backward pass of an affine
LayerNorm, vmapped over n cotangents, into one YNNPACK "reduce" library
fusion once n·T (rows reduced) reaches ~4096, and that fusion returns wrong
gradients (~10% relative at [1, 401, 768], n = 11). `cam.initial_cams` is
exactly that pattern (GradCAM vmapped over B·K one-hot cotangents through
block 12's LayerNorms), so CPU runs with B·kmax ≥ 11 got wrong CAMs.
Reproducer, HLO and measurements: docs/known_issues.md.

Two parts:

- `apply()` (run when `ssr_jax` is imported, before any backend exists)
  appends `--xla_cpu_experimental_ynn_fusion_type=-LIBRARY_FUSION_TYPE_REDUCE`
  to XLA_FLAGS, keeping the user's own flags. The flag only changes the CPU
  compiler; JAX always creates the CPU client (host computations), so it is
  added whatever the default backend. An XLA flag the binary does not know
  aborts the process at backend start, so it is added only where every XLA
  binary that parses XLA_FLAGS knows it: jaxlib versions in `VERIFIED` are
  trusted (checked by hand: the flag is accepted and fixes the fault);
  for any other jaxlib, and for every installed PJRT plugin (CUDA, ROCm,
  libtpu: each links its own XLA and parses XLA_FLAGS), the shared library
  is searched for the flag's name and its enum value (an mmap search, tens
  of ms; a version table alone cannot know about future removals of an
  "experimental" flag, and a subprocess probe would cost ~1 s per import).
  `SSR_JAX_XLA_GUARD=0` turns the guard off (tests, diagnosis).
- `self_check()` runs the reproducer at the failing size on the active
  backend and compares jit(vmap(vjp)) with a float64 numpy LayerNorm
  backward; `main` refuses to train or evaluate when they disagree, so a
  future jaxlib, GPU or TPU with a similar fault is caught rather than
  trained on. `report()` is what runs record (results.json, metrics).
"""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import mmap
import os
import sys
import time
from typing import Any

FLAG_NAME = "xla_cpu_experimental_ynn_fusion_type"
FLAG_VALUE = "-LIBRARY_FUSION_TYPE_REDUCE"
FLAG = f"--{FLAG_NAME}={FLAG_VALUE}"
ENV = "SSR_JAX_XLA_GUARD"
# jaxlib versions checked to accept FLAG (and, for AFFECTED, to miscompile
# without it): `XLA_FLAGS=FLAG python -c "import jax; jax.devices()"` and
# the reproducer in docs/known_issues.md.
VERIFIED = frozenset({"0.10.2"})
AFFECTED = frozenset({"0.10.2"})
# Reproducer size: one image's 401 tokens (ViT-B/16 at 320², CLS + 20×20)
# of width 768, 12 cotangents (B·K = 2·6). The fault needs n·T ≳ 4096.
CHECK_SHAPE = (1, 401, 768)
CHECK_N = 12
# float32 LayerNorm backward vs a float64 reference: each output element is
# a few terms plus two means over D = 768, rounding error ~ eps·sqrt(D)·c
# ≈ 1.2e-7·28·(a few) ≈ 1e-5 relative at worst; the fault is ≥ 1e-1.
CHECK_RTOL = 1e-4
_OFF = ("0", "false", "no", "off")
_MIN_BINARY = 10 << 20  # XLA lives in the big shared libraries

_state: dict[str, Any] = {"guard": "not applied", "detail": ""}
_check: dict[str, Any] | None = None


def _package_dir(name: str) -> list[str]:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    return list(spec.submodule_search_locations)


def _binaries(dirs: list[str]) -> list[str]:
    out = []
    for d in dirs:
        for path in sorted(glob.glob(os.path.join(d, "**", "*.so*"),
                                     recursive=True)):
            try:
                if os.path.getsize(path) >= _MIN_BINARY:
                    out.append(path)
            except OSError:
                pass
    return out


def _contains(path: str, needles: tuple[bytes, ...]) -> bool:
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0,
                                              access=mmap.ACCESS_READ) as m:
            return all(m.find(n) >= 0 for n in needles)
    except (OSError, ValueError):
        return False


def jaxlib_version() -> str | None:
    try:
        return importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return None


def flag_known() -> tuple[bool, str]:
    """Whether every installed XLA binary accepts FLAG (without starting one).

    Returns:
      (known, reason): reason names the binary that lacks it, if any.
    """
    version = jaxlib_version()
    if version is None:
        return False, "jaxlib is not installed"
    plugins = []
    for name in ("jax_plugins", "jax_cuda12_plugin", "jax_cuda13_plugin",
                 "jax_rocm60_plugin", "jax_rocm7_plugin", "libtpu"):
        plugins += _binaries(_package_dir(name))
    to_scan = list(dict.fromkeys(plugins))
    if version not in VERIFIED:
        core = _binaries(_package_dir("jaxlib"))
        if not core:
            return False, f"jaxlib {version}: no XLA binary found to check"
        to_scan = core + to_scan
    needles = (FLAG_NAME.encode(), FLAG_VALUE[1:].encode())
    for path in to_scan:
        if not _contains(path, needles):
            return False, f"{path} does not know --{FLAG_NAME}"
    how = "verified" if version in VERIFIED else "found in the binary"
    return True, f"jaxlib {version} ({how})"


def _backend_started() -> bool:
    xb = sys.modules.get("jax._src.xla_bridge")
    return bool(getattr(xb, "_backends", None))


def apply(environ: Any = None) -> str:
    """Adds FLAG to XLA_FLAGS if it is safe and useful; returns the status.

    Status: "applied", "disabled" (SSR_JAX_XLA_GUARD=0), "user" (XLA_FLAGS
    already sets the fusion type), "unsupported" (a binary lacks the flag),
    "late" (a JAX backend already started: XLA_FLAGS is read once).
    """
    env = os.environ if environ is None else environ
    flags = env.get("XLA_FLAGS", "")
    if env.get(ENV, "1").strip().lower() in _OFF:
        status, detail = "disabled", f"{ENV}={env.get(ENV)}"
    elif FLAG_NAME in flags:
        status, detail = "user", "XLA_FLAGS already sets it"
    elif _backend_started():
        status, detail = "late", ("a JAX backend started before ssr_jax was "
                                  "imported; import ssr_jax first")
    else:
        known, detail = flag_known()
        if known:
            env["XLA_FLAGS"] = f"{flags} {FLAG}".strip()
            status = "applied"
        else:
            status = "unsupported"
    _state.update(guard=status, detail=detail)
    return status


def _ln_backward_f64(x, scale, ct, eps):
    """Float64 numpy LayerNorm VJP (independent of XLA)."""
    import numpy as np
    x, scale, ct = (np.asarray(a, np.float64) for a in (x, scale, ct))
    mu = x.mean(-1, keepdims=True)
    xc = x - mu
    rstd = 1.0 / np.sqrt((xc * xc).mean(-1, keepdims=True) + eps)
    xhat = xc * rstd
    g = ct * scale
    return rstd * (g - g.mean(-1, keepdims=True)
                   - xhat * (g * xhat).mean(-1, keepdims=True))


def self_check(force: bool = False) -> dict[str, Any]:
    """jit(vmap(vjp)) through LayerNorm vs float64 numpy, default backend.

    Cached after the first call. Returns {"ok", "rel_err", "rtol", "shape",
    "n", "seconds"}.
    """
    global _check
    if _check is not None and not force:
        return _check
    import jax
    import jax.numpy as jnp
    import numpy as np

    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    d = CHECK_SHAPE[-1]
    scale = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
    bias = (0.05 * rng.standard_normal(d)).astype(np.float32)
    x = rng.standard_normal(CHECK_SHAPE).astype(np.float32)
    ct = rng.standard_normal((CHECK_N,) + CHECK_SHAPE).astype(np.float32)
    eps = 1e-5

    def ln(x, s, b):
        m = x.mean(-1, keepdims=True)
        v = jnp.square(x - m).mean(-1, keepdims=True)
        return (x - m) * jax.lax.rsqrt(v + eps) * s + b

    @jax.jit
    def grads(x, s, b, ct):
        _, vjp_fn = jax.vjp(lambda x: ln(x, s, b), x)
        return jax.vmap(vjp_fn)(ct)[0]

    got = np.asarray(grads(x, scale, bias, ct), np.float64)
    want = _ln_backward_f64(x, scale, ct, eps)
    rel = float(np.abs(got - want).max() / np.abs(want).max())
    _check = {"ok": bool(rel <= CHECK_RTOL), "rel_err": rel,
              "rtol": CHECK_RTOL, "shape": list(CHECK_SHAPE), "n": CHECK_N,
              "seconds": round(time.perf_counter() - t0, 3)}
    return _check


def report(run_check: bool = True) -> dict[str, Any]:
    """Backend, versions, guard status and self-check, for run records."""
    import jax
    out = {"backend": jax.default_backend(), "jax": jax.__version__,
           "jaxlib": jaxlib_version(), "guard": _state["guard"],
           "guard_detail": _state["detail"],
           "xla_flags": os.environ.get("XLA_FLAGS", "")}
    if run_check:
        out["self_check"] = self_check()
    return out


def refusal(rep: dict[str, Any]) -> str:
    """The message `main` prints when the self-check fails."""
    c = rep["self_check"]
    return (
        f"XLA self-check failed on backend {rep['backend']!r} (jax "
        f"{rep['jax']}, jaxlib {rep['jaxlib']}): jit(vmap(vjp)) through a "
        f"LayerNorm of shape {c['shape']} with {c['n']} cotangents is off "
        f"by {c['rel_err']:.2g} relative (allowed {c['rtol']:g}), so "
        "GradCAM (cam.initial_cams) would compute wrong CAMs. Guard status: "
        f"{rep['guard']} ({rep['guard_detail']}). Fix: unset {ENV} if it is 0, "
        f"or run with XLA_FLAGS=\"{FLAG}\" (CPU), or use another jaxlib "
        "version; see docs/known_issues.md.")
