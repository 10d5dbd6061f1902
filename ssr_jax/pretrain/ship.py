r"""Rebuild the shipped tiny encoders and check them bit for bit.

  python -m ssr_jax.pretrain.ship --config configs/synthetic.py
  python -m ssr_jax.pretrain.ship --config configs/synthetic.py:smoke
  python -m ssr_jax.pretrain.ship --config configs/synthetic.py --write

trains the config's CLIP and affinity encoder (`model.dino_kind`) into a
temporary cache, ignoring the shipped and the cached snapshots (as
`--config.pretrain.force=True`), on the config's world (generated or
reused, `pretrain.ensure_world`), then compares every file's sha256 with
the manifest of `ssr_jax/pretrain/shipped/` and prints one row per file:
match, differ, missing (the manifest lists a file the rebuild did not
write, or nothing ships under that key) or extra. Exits 1 on any
difference, 0 when everything matches.

`pretrain.json` holds the wall and CPU times of the run that wrote it
(`TIMING_FIELDS`), which no rerun can repeat: it is compared with those
fields left out (its losses, logit scale, key and step count must match).

Bit-for-bit needs the build's setting: the CPU backend
(`JAX_PLATFORMS=cpu` where there is an accelerator), the same jaxlib and
XLA_FLAGS, and as many CPUs as the build could use (XLA:CPU's thread pool
follows the CPU affinity; on a bigger machine `taskset -c 0,1`). The table
is preceded by a note for each of these that differs from the manifest.

`--write` stores the rebuilt snapshots as the shipped ones instead (each
replaced atomically) and records in the manifest, per entry: kind, key,
the config argument, the world's identity, every file's sha256, the
command that reproduces it and where it was built (CPU, devices, jax and
jaxlib, XLA_FLAGS, date). Config overrides (`--config.pretrain...`) are
part of the recorded command. Stale entries (keys no config uses any more)
are left for you to remove (`git rm -r` the directory and its manifest
entry).

Exit codes: 0 all match (or written), 1 a difference, 2 a bad command or
config.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import uuid
from collections.abc import Sequence
from typing import Any

from absl import logging

from ssr_jax import cli, config_check
from ssr_jax.pretrain import cache, world
from ssr_jax.pretrain.dino import affinity_kind

# pretrain.json fields that time the run (never repeatable).
TIMING_FIELDS = ("seconds", "cpu_seconds", "setup_and_compile_seconds")
EXIT_DIFFER = 1
EXIT_USER = cli.EXIT_USER


def _stable_info(path: str) -> dict[str, Any]:
    info = world.read_json(path)
    return {k: v for k, v in info.items() if k not in TIMING_FIELDS}


def compare(built: str, shipped: tuple[str, dict[str, Any]] | None
            ) -> list[tuple[str, str, str, str]]:
    """(file, built sha256, shipped sha256, verdict) per file of the rebuilt
    snapshot `built` against the shipped (directory, manifest entry); the
    verdict is "match", "differ", "missing" or "extra"."""
    rows = []
    have = sorted(os.listdir(built))
    if shipped is None:
        return [(n, cache.file_sha256(os.path.join(built, n)), "-",
                 "missing") for n in have]
    src, entry = shipped
    want = entry["files"]
    for name in sorted(set(have) | set(want)):
        b = (cache.file_sha256(os.path.join(built, name))
             if name in have else "-")
        s = want.get(name, "-")
        if name not in want:
            verdict = "extra"
        elif name not in have:
            verdict = "missing"
        elif name == cache.INFO_FILE and b != s:
            same = (_stable_info(os.path.join(built, name))
                    == _stable_info(os.path.join(src, name)))
            verdict = "match" if same else "differ"
            name += " (timings ignored)"
        else:
            verdict = "match" if b == s else "differ"
        rows.append((name, b, s, verdict))
    return rows


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_info() -> dict[str, Any]:
    """Where and with what this process builds: CPU, devices, versions."""
    import importlib.metadata

    import jax

    return {
        "date": datetime.datetime.now(datetime.UTC).strftime(
            "%Y-%m-%dT%H:%M:%SZ"),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        # XLA:CPU sizes its thread pool by the CPUs this process may run
        # on, and the float reductions' order follows it: the bits are
        # reproduced with the same number (measured: smoke under
        # `taskset -c 0` differs from the 2-CPU build).
        "schedulable_cpus": (len(os.sched_getaffinity(0))
                             if hasattr(os, "sched_getaffinity")
                             else os.cpu_count()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "backend": jax.default_backend(),
        "devices": [d.device_kind for d in jax.devices()],
        "jax": jax.__version__,
        "jaxlib": importlib.metadata.version("jaxlib"),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def command(argv: Sequence[str]) -> str:
    """The command that reproduces (checks) the entries: this one without
    --write, --shipped_dir, --keep and pretrain.progress (which change
    nothing in the snapshots)."""
    drop = ("--write", "--nowrite", "--shipped_dir", "--keep",
            "--config.pretrain.progress")
    kept, skip = [], False
    for a in argv[1:]:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in drop:
            skip = "=" not in a and name in ("--shipped_dir", "--keep")
            continue
        kept.append(a)
    return "python -m ssr_jax.pretrain.ship " + shlex.join(kept)


def _write_entry(built: str, shipped_dir: str, name: str) -> None:
    """Replaces `<shipped_dir>/<name>` by a copy of `built` (tmp + rename)."""
    final = os.path.join(shipped_dir, name)
    tag = uuid.uuid4().hex[:8]
    tmp = os.path.join(shipped_dir, f".{name}.tmp-{tag}")
    old = os.path.join(shipped_dir, f".{name}.old-{tag}")
    try:
        shutil.copytree(built, tmp)
        if os.path.isdir(final):
            os.rename(final, old)
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def write_manifest(shipped_dir: str, manifest: dict[str, Any]) -> None:
    path = os.path.join(shipped_dir, cache.MANIFEST_FILE)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def _config_arg(argv: Sequence[str]) -> str:
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return ""


def run(config, argv: Sequence[str], write: bool, shipped_dir: str,
        keep: str = "") -> int:
    """Rebuilds, compares or writes; returns the exit code."""
    root = world.ensure_world(config)
    kinds = ("clip", affinity_kind(config))
    keys = {k: cache.cache_key(config, k, root) for k in kinds}
    tmp_cache = tempfile.mkdtemp(prefix="ssr_jax_ship-")
    try:
        paths = cache.ensure_encoders(config, root, tmp_cache, force=True)
        if keep:
            os.makedirs(keep, exist_ok=True)
            for p in paths:
                dst = os.path.join(keep, os.path.basename(p))
                shutil.rmtree(dst, ignore_errors=True)
                shutil.copytree(p, dst)
        if write:
            os.makedirs(shipped_dir, exist_ok=True)
            manifest = cache.read_manifest(shipped_dir)
            manifest.setdefault("format", 1)
            info = build_info()
            for kind, path in zip(kinds, paths, strict=True):
                name = f"{kind}-{keys[kind]}"
                _write_entry(path, shipped_dir, name)
                files = sorted(os.listdir(os.path.join(shipped_dir, name)))
                manifest["entries"][name] = {
                    "kind": kind, "key": keys[kind],
                    "config": _config_arg(argv),
                    "pretrain_version": cache.PRETRAIN_VERSION,
                    "world": world.world_identity(root),
                    "files": {f: cache.file_sha256(
                        os.path.join(shipped_dir, name, f)) for f in files},
                    "command": command(argv),
                    "built": info,
                }
                print(f"wrote {os.path.join(shipped_dir, name)} "
                      f"({len(files)} files)")
            write_manifest(shipped_dir, manifest)
            print(f"updated {os.path.join(shipped_dir, cache.MANIFEST_FILE)}")
            return 0
        ok = True
        here = build_info()
        for kind in kinds:
            shipped = cache.shipped_entry(kind, keys[kind], shipped_dir)
            if shipped is None:
                continue
            there = dict(shipped[1]["built"])
            # entries written before the field existed: built unpinned
            there.setdefault("schedulable_cpus", there.get("cpu_count"))
            for field in ("backend", "cpu", "jaxlib", "xla_flags",
                          "schedulable_cpus"):
                if here[field] != there.get(field):
                    print(f"note: {kind}-{keys[kind]} was built with "
                          f"{field}={there.get(field)!r}, this rebuild has "
                          f"{here[field]!r}: the bits need not match "
                          "(docs/pretrain.md, 'Shipped encoders': CPU, "
                          "JAX_PLATFORMS=cpu, as many CPUs, e.g. taskset "
                          "-c 0,1)")
        print(f"{'entry':<26} {'file':<36} {'rebuilt':<16} "
              f"{'shipped':<16} verdict")
        for kind, path in zip(kinds, paths, strict=True):
            name = f"{kind}-{keys[kind]}"
            rows = compare(path, cache.shipped_entry(kind, keys[kind],
                                                     shipped_dir))
            for file, b, s, verdict in rows:
                ok = ok and verdict == "match"
                print(f"{name:<26} {file:<36} {b[:16]:<16} {s[:16]:<16} "
                      f"{verdict}")
            if not any(v == "match" for *_, v in rows) and all(
                    v == "missing" and s == "-" for _, _, s, v in rows):
                print(f"  (no shipped entry {name}: the config or the "
                      "world differs from every shipped one; --write adds "
                      "it)")
        print("all files match the shipped snapshots" if ok else
              "DIFFERENCES: the rebuild does not reproduce the shipped "
              "snapshots (see docs/pretrain.md, 'Shipped encoders')")
        return 0 if ok else EXIT_DIFFER
    finally:
        shutil.rmtree(tmp_cache, ignore_errors=True)


def main(argv: Sequence[str]) -> None:
    from absl import app

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        config = _CONFIG.value
        has_pretrain = config is not None and "pretrain" in config
    except OSError as e:  # the lazy load of a missing or broken file
        lines = [ln.strip() for ln in str(e).splitlines()]
        print("ssr_jax.pretrain.ship: cannot load the config file: "
              + " ".join(ln for ln in lines if ln), file=sys.stderr)
        sys.exit(EXIT_USER)
    if config is None:
        print("ssr_jax.pretrain.ship: --config is required, e.g. --config "
              "configs/synthetic.py", file=sys.stderr)
        sys.exit(EXIT_USER)
    if not has_pretrain:
        print("ssr_jax.pretrain.ship: the config has no `pretrain` section: "
              "only the embedded configs (configs/synthetic.py) pretrain "
              "encoders", file=sys.stderr)
        sys.exit(EXIT_USER)
    errors = (config_check.validate(config, check_devices=False)
              + cache.validate(config))
    if errors:
        print("ssr_jax.pretrain.ship: the config has problems:\n  - "
              + "\n  - ".join(errors), file=sys.stderr)
        sys.exit(EXIT_USER)
    logging.set_verbosity(logging.INFO)
    sys.exit(run(config, sys.argv, _WRITE.value,
                 _SHIPPED_DIR.value or cache.SHIPPED_DIR, _KEEP.value))


if __name__ == "__main__":
    # Flags only when run, so that tests and tools can import this module
    # beside ssr_jax.main (which defines its own --config).
    from absl import app, flags
    from ml_collections import config_flags

    _CONFIG = config_flags.DEFINE_config_file(
        "config", None, "Config file whose encoders to rebuild, e.g. "
        "configs/synthetic.py or configs/synthetic.py:smoke.")
    _WRITE = flags.DEFINE_bool(
        "write", False, "store the rebuilt snapshots as the shipped ones and "
        "update the manifest, instead of comparing")
    _SHIPPED_DIR = flags.DEFINE_string(
        "shipped_dir", "", "the shipped folder (default: the package's "
        "ssr_jax/pretrain/shipped)")
    _KEEP = flags.DEFINE_string(
        "keep", "", "also copy the rebuilt cache entries into this directory "
        "(for inspection); default: deleted")
    # A bad flag or config field: a short message with a suggestion (exit
    # 2), not a traceback.
    app.run(main, flags_parser=cli.flags_parser("pretrain.ship"))
