"""ssr_jax: SSR (Semantic and Spatial Rectification) for CLIP-based WSSS.

Importing the package is cheap (no JAX): configs import
`ssr_jax.config_defaults`. Import submodules for the real work.
"""

__version__ = "0.1.0"

# Before anything can start a JAX backend: work around an XLA:CPU
# miscompile of GradCAM's jit(vmap(vjp)) (ssr_jax/xla_guard.py; stdlib
# only, no JAX import).
from ssr_jax import xla_guard as _xla_guard  # noqa: E402

_xla_guard.apply()
