"""The method modules take plain arguments; config → arguments is
`ssr_jax.params.method_params`, once (docs/DESIGN.md "Layers").

Checked statically with `ast` on every method module's source: no
`ml_collections` import, no `.get(` call (a ConfigDict read; JAX's
`x.at[i].get()` is allowed), no name `config` / `cfg` / `*_config` and no
parameter annotated with ConfigDict. Then `method_params` against the
config it reads and the method functions' own defaults.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os

import pytest

from ssr_jax import cmpa, config_defaults, losses, par, params, sgc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHOD_MODULES = ("cam", "cmpa", "sgc", "sgc_mask", "par", "losses",
                  "segment_ops")
_CONFIG_NAMES = {"config", "cfg", "configdict", "config_dict"}


def _config_like(name: str) -> bool:
    n = name.lower()
    return n in _CONFIG_NAMES or n.endswith("_config") or n.endswith("_cfg")


def violations(source: str) -> list[str]:
    """What in `source` reads a config (empty = plain arguments only)."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            mods = ([a.name for a in node.names]
                    if isinstance(node, ast.Import) else [node.module or ""])
            out += [f"line {node.lineno}: imports {m}" for m in mods
                    if m.split(".")[0] == "ml_collections"]
        elif isinstance(node, ast.Call) and isinstance(
                node.func, ast.Attribute) and node.func.attr == "get":
            recv = node.func.value
            jax_at = (isinstance(recv, ast.Subscript)
                      and isinstance(recv.value, ast.Attribute)
                      and recv.value.attr == "at")
            if not jax_at:
                out.append(f"line {node.lineno}: .get( call")
        elif isinstance(node, ast.Name) and _config_like(node.id):
            out.append(f"line {node.lineno}: name {node.id!r}")
        elif isinstance(node, ast.arg):
            if _config_like(node.arg):
                out.append(f"line {node.lineno}: parameter {node.arg!r}")
            if node.annotation is not None and "ConfigDict" in \
                    ast.unparse(node.annotation):
                out.append(f"line {node.lineno}: parameter {node.arg!r} "
                           "annotated ConfigDict")
    return out


def test_violations_sees_config_reads():
    bad = (
        "from ml_collections import config_dict\n"
        "import ml_collections.config_flags\n"
        "def f(x, sgc_config):\n    return sgc_config.theta_h\n"
        "def g(x, p: config_dict.ConfigDict):\n    return p.get('k', 1)\n"
        "def h(x):\n    return config.sgc.mask\n")
    got = violations(bad)
    assert sorted(got) == sorted([
        "line 1: imports ml_collections",
        "line 2: imports ml_collections.config_flags",
        "line 3: parameter 'sgc_config'", "line 4: name 'sgc_config'",
        "line 5: parameter 'p' annotated ConfigDict",
        "line 5: name 'config_dict'", "line 6: .get( call",
        "line 8: name 'config'"]), got
    ok = ("import jax.numpy as jnp\n"
          "def f(x, i, k: int = 3):\n    return x.at[i].get() * k\n")
    assert violations(ok) == []


@pytest.mark.parametrize("module", METHOD_MODULES)
def test_method_module_takes_plain_arguments(module):
    path = os.path.join(ROOT, "ssr_jax", f"{module}.py")
    with open(path) as f:
        found = violations(f.read())
    assert not found, (
        f"ssr_jax/{module}.py reads a config ({found}); take plain "
        "arguments or a frozen dataclass and build it in "
        "ssr_jax/params.py `method_params`")


def _keyword_defaults(fn, names) -> dict:
    sig = inspect.signature(fn)
    return {n: sig.parameters[n].default for n in names}


def _fields(obj) -> dict:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def test_params_defaults_are_the_functions_and_the_base_configs():
    """Each dataclass' defaults equal the method function's keyword
    defaults, and `method_params(base_config())` equals the defaults."""
    s, p = sgc.SGCParams(), par.PARParams()
    assert _fields(s) == _keyword_defaults(sgc.refine_cams, _fields(s))
    assert _fields(p) == _keyword_defaults(par.pseudo_labels, _fields(p))
    heads = ("hidden_dim", "dim", "tau_init", "tau_min", "tied_init",
             "identity_init")
    c = cmpa.CMPAParams()
    assert {k: getattr(c, k) for k in heads} == _keyword_defaults(
        cmpa.CMPAHeads.__init__, heads)
    assert params.method_params(config_defaults.base_config()) == \
        params.MethodParams(sgc=s, cmpa=c, par=p, loss=losses.LossWeights())


def test_method_params_reads_every_field():
    c = config_defaults.base_config()
    c.sgc.mask, c.sgc.max_segments, c.sgc.segment_impl = "box", 64, "onehot"
    c.sgc.theta_r, c.sgc.kmeans_init = 0.7, "kmeans++"
    c.cmpa.num_prototypes, c.cmpa.tied_init = 5, False
    c.cmpa.valid_tokens_only = True
    c.par.dilations = [1, 3]
    c.loss.seg_weight = 0.5
    mp = params.method_params(c)
    assert (mp.sgc.mask_kind, mp.sgc.num_segments, mp.sgc.impl) == (
        "box", 64, "onehot")
    assert (mp.sgc.theta_r, mp.sgc.kmeans_init) == (0.7, "kmeans++")
    assert (mp.cmpa.num_prototypes, mp.cmpa.tied_init,
            mp.cmpa.valid_tokens_only) == (5, False, True)
    assert mp.par.dilations == (1, 3)
    assert mp.loss.seg_weight == 0.5
    # Frozen: a method function cannot change the run's knobs.
    with pytest.raises(dataclasses.FrozenInstanceError):
        mp.sgc.theta_h = 0.1
    # A config without the optional fields (older saved configs) works.
    del c.sgc["kmeans_seed"], c.cmpa["identity_init"]
    mp = params.method_params(c)
    assert (mp.sgc.kmeans_seed, mp.cmpa.identity_init) == (0, False)
