"""ssr_jax: SSR (Semantic and Spatial Rectification) for CLIP-based WSSS.

Importing the package is cheap (no JAX): configs import
`ssr_jax.config_defaults`. Import submodules for the real work.
"""

__version__ = "0.1.0"
