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
    ("--config.data.class_slot_buckets=(0,2)", "data.class_slot_buckets"),
])
def test_invalid_values_are_listed(override, needle):
    _short_error(_main("--config", VOC, override), needle)


def test_missing_paths_are_named(tmp_path):
    r = _main("--config", VOC, f"--config.data.root={tmp_path}/nope",
              "--config.model.clip_path=", "--workdir", str(tmp_path / "w"))
    _short_error(r, "data.root", "does not exist", "model.clip_path")


def test_missing_config_file():
    _short_error(_main("--config", "configs/nope.py"), "nope.py")


def test_unknown_field_suggests_the_field_of_another_section():
    syn = os.path.join(ROOT, "configs", "synthetic.py")
    _short_error(_main("--config", syn, "--config.data.slic_cache=False"),
                 "unknown config field 'data.slic_cache' (did you mean "
                 "sgc.slic_cache")


def test_help_shows_examples():
    r = _main("--helpshort")
    assert r.returncode in (0, 1)  # absl exits 1 after printing the help
    for example in ("--config configs/synthetic.py --workdir runs/synth",
                    "--config.mode=eval", "configs/voc.py:paper",
                    "docs/errors.md"):
        assert example in r.stdout, example


def test_synthetic_config_refuses_data_root(tmp_path):
    syn = os.path.join(ROOT, "configs", "synthetic.py")
    _short_error(_main("--config", syn, f"--config.data.root={tmp_path}"),
                 "configs/synthetic.py generates and reads its own world",
                 "configs/voc.py")


def test_weights_file_instead_of_directory(tmp_path):
    weights = tmp_path / "clip" / "model.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"x")
    r = _main("--config", VOC, f"--config.data.root={tmp_path}",
              f"--config.model.clip_path={weights}")
    _short_error(r, "is a file; a Hugging Face snapshot DIRECTORY is "
                 "expected", f"--config.model.clip_path={weights.parent}")


def test_eval_needs_no_dino_path(tmp_path):
    (tmp_path / "clip").mkdir()
    r = _main("--config", VOC, "--config.mode=eval",
              f"--config.data.root={tmp_path}",
              f"--config.model.clip_path={tmp_path / 'clip'}",
              "--config.model.dino_path=")
    # It fails on the missing val list, not on DINO.
    _short_error(r, "val.txt does not exist")
    assert "model.dino_path" not in r.stderr


def test_relative_paths_are_resolved_against_the_cwd(tmp_path):
    from ml_collections import config_dict

    from ssr_jax import main

    c = config_dict.ConfigDict({
        "data": {"name": "voc", "root": "data/VOC", "cache_dir": ""},
        "model": {"clip_path": "~/w/clip", "dino_path": "gs://b/dino"},
        "train": {"checkpoint_dir": ""},
        "eval": {"checkpoint": "runs/x/checkpoints/5"}})
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        workdir = main.resolve_paths(c, None)
    finally:
        os.chdir(cwd)
    assert workdir == str(tmp_path / "runs" / "voc")
    assert c.data.root == str(tmp_path / "data" / "VOC")
    assert c.model.clip_path == os.path.expanduser("~/w/clip")
    assert c.model.dino_path == "gs://b/dino"  # URLs stay as given
    assert c.data.cache_dir == "" and c.train.checkpoint_dir == ""
    assert c.eval.checkpoint == str(tmp_path / "runs/x/checkpoints/5")
    c.eval.checkpoint = "30000"
    main.resolve_paths(c, "w")
    assert c.eval.checkpoint == "30000"  # a step stays a step


def test_second_training_run_on_a_workdir_is_refused(tmp_path):
    from ssr_jax import main

    syn = os.path.join(ROOT, "configs", "synthetic.py")
    held = main.lock_workdir(str(tmp_path))
    try:
        r = _main("--config", syn + ":tiny", f"--workdir={tmp_path}",
                  "--config.train.batch_size=8")  # conftest: 8 devices
    finally:
        held.close()
    _short_error(r, f"workdir {tmp_path} is in use by another training run",
                 f"pid {os.getpid()}", "another --workdir")


@pytest.mark.parametrize("module,prog", [
    ("ssr_jax.pretrain_report", "pretrain_report"),
    ("tools.attention_mass", "attention_mass"),
])
def test_other_programs_report_config_typos_briefly(module, prog):
    """The diagnostics programs share main's flag parser (ssr_jax.cli; its
    other messages are tested through main above)."""
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    syn = os.path.join(ROOT, "configs", "synthetic.py")
    r = subprocess.run(
        [sys.executable, "-m", module, f"--config={syn}:tiny",
         "--config.pretrain.dino.stpes=3"], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=120)
    _short_error(r, f"{prog}: error in the command line",
                 "unknown config field 'pretrain.dino.stpes' (did you mean "
                 "pretrain.dino.steps")
