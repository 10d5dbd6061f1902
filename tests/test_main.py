"""`python -m ssr_jax.main`: user mistakes are short, clear errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOC = os.path.join(ROOT, "configs", "voc.py")


def _main(*args, timeout=120):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "ssr_jax.main", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _short_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) <= 12, r.stderr
    for needle in needles:
        assert needle in r.stderr, (needle, r.stderr)


def test_unknown_config_field():
    _short_error(_main("--config", VOC, "--config.bogus=1"),
                 "unknown config field", "bogus")


def test_unknown_nested_field_suggests_spelling():
    _short_error(_main("--config", VOC, "--config.train.batchsize=4"),
                 "batchsize")


def test_bad_value_type():
    _short_error(_main("--config", VOC, "--config.train.batch_size=abc"),
                 "batch_size")


def test_bad_preset():
    _short_error(_main("--config", VOC + ":foo"), "foo", "weclip")


def test_missing_config_flag():
    _short_error(_main(), "--config")


@pytest.mark.parametrize("override,needle", [
    ("--config.data.crop_size=100", "multiple of the patch size"),
    ("--config.mode=predict", "mode='predict'"),
    ("--config.sgc.mask=boxes", "sgc.mask"),
    ("--config.cmpa.variant=both", "cmpa.variant"),
])
def test_invalid_values_are_listed(override, needle):
    _short_error(_main("--config", VOC, override), needle)


def test_missing_paths_are_named(tmp_path):
    r = _main("--config", VOC, f"--config.data.root={tmp_path}/nope",
              "--config.model.clip_path=", "--workdir", str(tmp_path / "w"))
    _short_error(r, "data.root", "does not exist", "model.clip_path")


def test_missing_config_file():
    _short_error(_main("--config", "configs/nope.py"), "nope.py")
