"""The repository's config files, loaded as `--config FILE[:ARG]` loads
them (the tests' one loader)."""

from __future__ import annotations

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(arg: str = "configs/synthetic.py:tiny"):
    """`get_config(ARG)` of `FILE` (relative to the repository root) for
    `arg` = "FILE[:ARG]"."""
    path, _, variant = arg.partition(":")
    name = "config_" + os.path.basename(path)[:-3]
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)
