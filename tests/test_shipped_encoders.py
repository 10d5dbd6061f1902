"""Tests of the shipped tiny encoders (ssr_jax/pretrain/shipped, cache.py's
install path, ssr_jax.pretrain.ship).

No pretraining runs here: the trainers are replaced by fakes that count
their calls (and write a valid-looking snapshot) or that fail, so these
tests check which path `ensure_encoders` takes. The real rebuild is
`python -m ssr_jax.pretrain.ship --config configs/synthetic.py`
(docs/pretrain.md, "Shipped encoders").
"""

import json
import os
import shutil
import subprocess
import sys

import config_fixtures
import pytest

from ssr_jax import pretrain
from ssr_jax.data import synthetic
from ssr_jax.models import loading
from ssr_jax.pretrain import cache, ship

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT, SMOKE = "configs/synthetic.py", "configs/synthetic.py:smoke"


load_config = config_fixtures.load_config


MANIFEST = cache.read_manifest()


def entries_of(config_arg: str) -> dict:
    return {n: e for n, e in MANIFEST["entries"].items()
            if e["config"] == config_arg}


def world_stub(tmp_path, identity) -> str:
    """A root holding only the world.json with `identity`: all that
    `cache_key` reads of a world."""
    root = tmp_path / "world"
    root.mkdir()
    (root / "world.json").write_text(json.dumps(identity))
    return str(root)


@pytest.fixture
def default_root(tmp_path):
    (entry, *_) = entries_of(DEFAULT).values()
    return world_stub(tmp_path, entry["world"])


def no_training(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("trained although a shipped snapshot fits")
    monkeypatch.setattr(cache, "pretrain_clip", fail)
    monkeypatch.setattr(cache, "pretrain_dino", fail)


def fake_training(monkeypatch) -> dict:
    calls = {"clip": 0, "dino": 0}

    def fake(kind):
        def train(config, root, out_dir, progress=True):
            calls[kind] += 1
            os.makedirs(out_dir)
            for name in (loading.CONFIG, loading.WEIGHTS):
                with open(os.path.join(out_dir, name), "w") as f:
                    f.write(f"fake {kind}")
            return {"final_loss": 0.0}
        return train
    monkeypatch.setattr(cache, "pretrain_clip", fake("clip"))
    monkeypatch.setattr(cache, "pretrain_dino", fake("dino"))
    return calls


# --- the shipped files ------------------------------------------------------


def test_manifest_hashes_match_the_shipped_files():
    assert MANIFEST["entries"], "nothing ships"
    for name, entry in MANIFEST["entries"].items():
        assert name == f"{entry['kind']}-{entry['key']}"
        path = os.path.join(cache.SHIPPED_DIR, name)
        cache.verify_shipped(path, entry)  # raises on any mismatch
        assert {cache.INFO_FILE, loading.CONFIG,
                loading.WEIGHTS} <= set(entry["files"])
        info = json.load(open(os.path.join(path, cache.INFO_FILE)))
        assert info["key"] == entry["key"] and info["kind"] == entry["kind"]
        assert entry["command"].startswith(
            "python -m ssr_jax.pretrain.ship --config ")
        assert entry["config"] in entry["command"]
        for field in ("date", "cpu", "jax", "jaxlib", "backend"):
            assert entry["built"][field]
        assert entry["pretrain_version"] == cache.PRETRAIN_VERSION


@pytest.mark.parametrize("config_arg", [DEFAULT, SMOKE])
def test_the_configs_encoders_ship(tmp_path, config_arg):
    """The default's and smoke's keys (on the world the manifest records)
    are shipped: a change to their pretraining config, to PRETRAIN_VERSION
    or to the world would otherwise make every fresh clone pretrain
    again. Fix: `python -m ssr_jax.pretrain.ship --config <config>
    --write`."""
    config = load_config(config_arg)
    entries = entries_of(config_arg)
    assert len(entries) == 2, f"{config_arg}: {sorted(entries)}"
    (identity, *others) = [e["world"] for e in entries.values()]
    assert all(o == identity for o in others)
    root = world_stub(tmp_path, identity)
    for kind in ("clip", pretrain.affinity_kind(config)):
        name = f"{kind}-{cache.cache_key(config, kind, root)}"
        assert name in entries, (
            f"{name} ({config_arg}) does not ship: run python -m "
            f"ssr_jax.pretrain.ship --config {config_arg} --write")


def test_the_smoke_world_has_the_recorded_identity(tmp_path):
    """Generating the smoke world (~5 s) gives the world.json identity the
    manifest records: a drift in the world generator would silently make
    every fresh clone pretrain."""
    config = load_config(SMOKE)
    w = config.synthetic
    root = str(tmp_path / "smoke_world")
    synthetic.generate(root, seed=w.seed, num_train=w.num_train,
                       num_val=w.num_val, image_size=w.image_size)
    got = pretrain.world_identity(root)
    for entry in entries_of(SMOKE).values():
        assert json.loads(json.dumps(got)) == entry["world"]


# --- ensure_encoders ----------------------------------------------------------


def test_a_miss_installs_the_shipped_snapshot_without_training(
        monkeypatch, default_root, tmp_path):
    no_training(monkeypatch)
    config = load_config(DEFAULT)
    out = str(tmp_path / "cache")
    paths = pretrain.ensure_encoders(config, default_root, out)
    for kind, path in zip(("clip", "dino"), paths, strict=True):
        key = cache.cache_key(config, kind, default_root)
        assert path == os.path.join(out, f"{kind}-{key}")
        assert pretrain.is_complete(path, key)
        cache.verify_shipped(path, MANIFEST["entries"][f"{kind}-{key}"])
    assert not [d for d in os.listdir(out) if d.startswith(".")]
    # a second call is a plain cache hit
    assert pretrain.ensure_encoders(config, default_root, out) == paths


@pytest.mark.parametrize("damage", ["flip", "missing", "extra"])
def test_a_damaged_shipped_copy_is_refused(monkeypatch, default_root,
                                           tmp_path, damage):
    no_training(monkeypatch)
    config = load_config(DEFAULT)
    shipped = str(tmp_path / "shipped")  # a copy: the real one is untouched
    shutil.copytree(cache.SHIPPED_DIR, shipped)
    key = cache.cache_key(config, "clip", default_root)
    weights = os.path.join(shipped, f"clip-{key}", loading.WEIGHTS)
    if damage == "flip":
        with open(weights, "r+b") as f:
            f.seek(-1, os.SEEK_END)
            last = f.read(1)
            f.seek(-1, os.SEEK_END)
            f.write(bytes([last[0] ^ 1]))
        match = "model.safetensors has sha256"
    elif damage == "missing":
        os.remove(weights)
        match = "model.safetensors is missing"
    else:
        open(os.path.join(os.path.dirname(weights), "notes.txt"),
             "w").close()
        match = "files the manifest does not list: notes.txt"
    out = str(tmp_path / "cache")
    with pytest.raises(loading.WeightsError, match=match) as e:
        pretrain.ensure_encoders(config, default_root, out,
                                 shipped_dir=shipped)
    assert "pretrain.force=True" in str(e.value)
    assert not os.path.exists(os.path.join(out, f"clip-{key}"))


def test_force_trains_even_when_cached_or_shipped(monkeypatch, default_root,
                                                  tmp_path):
    config = load_config(DEFAULT)
    out = str(tmp_path / "cache")
    no_training(monkeypatch)
    shipped_paths = pretrain.ensure_encoders(config, default_root, out)
    calls = fake_training(monkeypatch)
    config.pretrain.force = True
    paths = pretrain.ensure_encoders(config, default_root, out)
    assert calls == {"clip": 1, "dino": 1}
    assert paths == shipped_paths  # the cache entries were replaced
    for kind, path in zip(("clip", "dino"), paths, strict=True):
        with open(os.path.join(path, loading.WEIGHTS)) as f:
            assert f.read() == f"fake {kind}"
        assert pretrain.is_complete(
            path, cache.cache_key(config, kind, default_root))
    assert not [d for d in os.listdir(out) if d.startswith(".")]
    # the argument overrides the config field
    pretrain.ensure_encoders(config, default_root, out, force=False)
    assert calls == {"clip": 1, "dino": 1}


def test_a_key_without_a_shipped_snapshot_trains(monkeypatch, default_root,
                                                 tmp_path):
    calls = fake_training(monkeypatch)
    config = load_config(DEFAULT)
    config.pretrain.clip.steps += 1  # CLIP's key changes, DINO's does not
    clip_path, dino_path = pretrain.ensure_encoders(
        config, default_root, str(tmp_path / "cache"))
    assert calls == {"clip": 1, "dino": 0}
    dino_name = os.path.basename(dino_path)
    cache.verify_shipped(dino_path, MANIFEST["entries"][dino_name])
    # another world: nothing ships for it
    (entry, *_) = entries_of(DEFAULT).values()
    other = tmp_path / "other"
    other.mkdir()
    (other / "world").mkdir()
    (other / "world" / "world.json").write_text(
        json.dumps({**entry["world"], "digest": "0" * 64}))
    pretrain.ensure_encoders(load_config(DEFAULT), str(other / "world"),
                             str(tmp_path / "cache"))
    assert calls == {"clip": 2, "dino": 1}


# --- the rebuild command ------------------------------------------------------


def snapshot(path, files: dict[str, str]) -> str:
    os.makedirs(path)
    for name, text in files.items():
        with open(os.path.join(path, name), "w") as f:
            f.write(text)
    return str(path)


def test_compare_names_each_file(tmp_path):
    info = {"key": "k", "final_loss": 1.5, "seconds": 10.0,
            "cpu_seconds": 20.0, "setup_and_compile_seconds": [1, 2]}
    shipped = snapshot(tmp_path / "shipped", {
        "model.safetensors": "w", "config.json": "c",
        "pretrain.json": json.dumps(info)})
    entry = {"files": {n: cache.file_sha256(os.path.join(shipped, n))
                       for n in os.listdir(shipped)}}
    slower = {**info, "seconds": 99.0, "cpu_seconds": 1.0}
    same = snapshot(tmp_path / "same", {
        "model.safetensors": "w", "config.json": "c",
        "pretrain.json": json.dumps(slower)})
    verdicts = {f: v for f, _, _, v in ship.compare(same, (shipped, entry))}
    assert set(verdicts.values()) == {"match"}
    assert "pretrain.json (timings ignored)" in verdicts

    other = snapshot(tmp_path / "other", {
        "model.safetensors": "W", "extra.txt": "",
        "pretrain.json": json.dumps({**info, "final_loss": 1.25})})
    verdicts = {f: v for f, _, _, v in ship.compare(other, (shipped, entry))}
    assert verdicts == {"model.safetensors": "differ",
                        "pretrain.json (timings ignored)": "differ",
                        "config.json": "missing", "extra.txt": "extra"}
    assert {v for *_, v in ship.compare(other, None)} == {"missing"}


def test_command_drops_the_write_flags():
    argv = ["ship.py", "--config", SMOKE, "--write", "--shipped_dir", "/x",
            "--keep=/y", "--config.pretrain.progress=False",
            "--config.pretrain.seed=1"]
    assert ship.command(argv) == (
        "python -m ssr_jax.pretrain.ship --config "
        "configs/synthetic.py:smoke --config.pretrain.seed=1")


def test_ship_reports_a_config_typo_without_a_traceback():
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run(
        [sys.executable, "-m", "ssr_jax.pretrain.ship", "--config",
         DEFAULT, "--config.pretrain.clip.stepz=3"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "unknown config field 'pretrain.clip.stepz'" in r.stderr
    assert "pretrain.clip.steps" in r.stderr  # the suggestion
    assert "Traceback" not in r.stderr


def test_ship_imports_beside_main():
    """ship defines its flags only when run: importing it next to
    ssr_jax.main (which defines --config) must not clash."""
    import importlib

    import ssr_jax.main  # noqa: F401

    importlib.reload(ship)
