"""The pretraining config check and the snapshot cache: `ensure_encoders`
caches each snapshot under a hash of (its kind, its config section, the
world's `world.json`, `PRETRAIN_VERSION`); an entry is written to a
temporary directory and renamed into place, so an interrupted run never
leaves a snapshot that looks complete. On a cache miss a snapshot that
ships in the package with the same kind and key (`shipped/`, listed with
its files' sha256 in `shipped/manifest.json`) is checked and copied in
instead of training; `pretrain.force` trains anyway. `ssr_jax.pretrain.ship`
rebuilds the shipped snapshots and checks them bit for bit.

The affinity encoder's kind is `model.dino_kind`: "dino" (a DINO ViT,
cached as `dino-<key>`) or "dinov2" (a DINOv2, `dinov2-<key>`); both are
trained from the `pretrain.dino` section. The DINOv2-only fields of that
section (`DINOV2_FIELDS`) are left out of the DINO key, so adding them
changed no existing DINO key.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import uuid
from collections.abc import Callable
from typing import Any

from absl import logging
from ml_collections import config_dict

from ssr_jax import config_check
from ssr_jax.data import synthetic
from ssr_jax.models import loading
from ssr_jax.pretrain.clip import pretrain_clip
from ssr_jax.pretrain.dino import KINDS, affinity_kind, pretrain_dino
from ssr_jax.pretrain.dino import key_section as dino_key_section
from ssr_jax.pretrain.world import encoder_cache_dir, read_json, world_identity

# Bump when a change to this package changes the weights it produces.
PRETRAIN_VERSION = 1
INFO_FILE = "pretrain.json"  # written last: marks a complete cache entry
# `pretrain.dino` fields that only a DINOv2 reads (absent = their default).
DINOV2_FIELDS = {"registers": 0}


def validate(config: config_dict.ConfigDict) -> list[str]:
    """Problems with `config.pretrain` (empty when it is good).

    CLIP and a DINO ViT must cut images into the same token grid as SSR
    reads (patch 16, `config_check.PATCH`): SGC fuses their affinities
    patch by patch. A DINOv2 (`model.dino_kind="dinov2"`) may use another
    patch size: its affinity is resampled onto CLIP's grid
    (`models.encoders.patch_affinity`).
    """
    e: list[str] = []
    k, d = config.pretrain.clip, config.pretrain.dino
    kind = affinity_kind(config)
    if kind not in KINDS:
        e.append(f"model.dino_kind={kind!r}: choose one of "
                 f"{', '.join(KINDS)}")
    fixed = [("clip.patch_size", k.patch_size)]
    if kind == "dino":
        fixed.append(("dino.patch_size", d.patch_size))
    elif d.patch_size < 1:
        e.append(f"pretrain.dino.patch_size={d.patch_size}: must be >= 1")
    for name, value in fixed:
        if value != config_check.PATCH:
            e.append(f"pretrain.{name}={value}: must be "
                     f"{config_check.PATCH}, the patch of SSR's token grid"
                     + (" (a DINOv2, model.dino_kind='dinov2', may use "
                        "another)" if name.startswith("dino") else ""))
    registers = d.get("registers", DINOV2_FIELDS["registers"])
    if (isinstance(registers, bool) or not isinstance(registers, int)
            or registers < 0):
        e.append(f"pretrain.dino.registers={registers!r}: must be an "
                 "integer >= 0 (DINOv2 with registers uses 4)")
    elif registers and kind != "dinov2":
        e.append(f"pretrain.dino.registers={registers}: only a DINOv2 has "
                 "registers; set model.dino_kind='dinov2' or registers=0")
    for name, value, patch in (
            ("clip.image_size", k.image_size, k.patch_size),
            ("dino.global_size", d.global_size, d.patch_size),
            ("dino.local_size", d.local_size, d.patch_size)):
        if value < patch or value % patch:
            e.append(f"pretrain.{name}={value}: must be a positive "
                     f"multiple of the patch size {patch}")
    for sec, name, heads in (("clip", "vision_width", k.vision_heads),
                             ("clip", "text_width", k.text_heads),
                             ("dino", "width", d.heads)):
        width = config.pretrain[sec][name]
        if heads < 1 or width % heads:
            e.append(f"pretrain.{sec}.{name}={width} is not a multiple of "
                     f"its {heads} attention heads")
    for sec in ("clip", "dino"):
        c = config.pretrain[sec]
        for name in ("steps", "batch_size", "lr"):
            if not c[name] > 0:
                e.append(f"pretrain.{sec}.{name}={c[name]}: must be > 0")
    lo, hi = k.rescale_range
    if not 0 < lo <= hi:
        e.append(f"pretrain.clip.rescale_range={tuple(k.rescale_range)}: "
                 "need 0 < low <= high")
    for name in ("global_scale", "local_scale"):
        lo, hi = d[name]
        if not 0 < lo <= hi <= 1:
            e.append(f"pretrain.dino.{name}={tuple(d[name])}: need "
                     "0 < low <= high <= 1 (shares of the image area)")
    if not 0 < k.token_keep <= 1:
        e.append(f"pretrain.clip.token_keep={k.token_keep}: must lie in "
                 "(0, 1]")
    if k.patch_pool not in ("mean", "pacl"):
        e.append(f"pretrain.clip.patch_pool={k.patch_pool!r}: choose "
                 "'mean' or 'pacl'")
    if k.normalization not in ("clip", "imagenet"):
        e.append(f"pretrain.clip.normalization={k.normalization!r}: choose "
                 "'clip' or 'imagenet'")
    w = config.get("synthetic", {})
    e += ["synthetic." + x for x in synthetic.caption_problems(
        w.get("caption_background_prob", 1.0),
        w.get("caption_background_scope", "all"))]
    if k.context_length < 3:
        e.append(f"pretrain.clip.context_length={k.context_length}: needs "
                 "room for BOS, a word and EOS")
    return e


# --- cache ------------------------------------------------------------------


def cache_key(config: config_dict.ConfigDict, kind: str, root: str) -> str:
    """sha256 (first 20 hex) of what determines the `kind` snapshot: the
    kind, its config section (architecture and training: `pretrain.clip`
    for "clip", `pretrain.dino` for "dino" and "dinov2"), `pretrain.seed`,
    the world's identity and `PRETRAIN_VERSION`.

    The "dino" key leaves out `DINOV2_FIELDS` (a DINO ViT does not read
    them), so DINO keys are those of the configs before those fields
    existed; the "dinov2" key fills them in with their defaults, so an
    absent field and its default name the same snapshot."""
    if kind not in ("clip", *KINDS):
        raise ValueError(f"kind={kind!r}: choose 'clip', "
                         + " or ".join(repr(k) for k in KINDS))
    section = config.pretrain["clip" if kind == "clip" else "dino"].to_dict()
    if kind != "clip":
        section = dino_key_section(section)  # iBOT fields only when on
    if kind == "dino":
        for name in DINOV2_FIELDS:
            section.pop(name, None)
    elif kind == "dinov2":
        section = {**DINOV2_FIELDS, **section}
    payload = {"kind": kind, "version": PRETRAIN_VERSION,
               "seed": config.pretrain.seed,
               "config": section,
               "world": world_identity(root)}
    blob = json.dumps(payload, sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def is_complete(path: str, key: str) -> bool:
    """A cache entry is complete when its `pretrain.json` (written last)
    names `key` and the snapshot files are present."""
    try:
        info = read_json(os.path.join(path, INFO_FILE))
    except (OSError, ValueError):
        return False
    return (info.get("key") == key
            and os.path.isfile(os.path.join(path, loading.CONFIG))
            and os.path.isfile(os.path.join(path, loading.WEIGHTS)))


# --- shipped snapshots -------------------------------------------------------

# Snapshots that ship inside the package (`ssr_jax/pretrain/shipped/`), one
# directory `<kind>-<key>` each, listed with every file's sha256 in the
# manifest; `python -m ssr_jax.pretrain.ship` rebuilds and checks them.
SHIPPED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                           "shipped")
MANIFEST_FILE = "manifest.json"


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(shipped_dir: str | None = None) -> dict[str, Any]:
    """The shipped manifest ({"entries": {}} when there is none)."""
    path = os.path.join(shipped_dir or SHIPPED_DIR, MANIFEST_FILE)
    if not os.path.isfile(path):
        return {"entries": {}}
    return read_json(path)


def shipped_entry(kind: str, key: str, shipped_dir: str | None = None
                  ) -> tuple[str, dict[str, Any]] | None:
    """(directory, manifest entry) of the shipped `<kind>-<key>`, or None
    when nothing with that kind and key ships."""
    shipped_dir = shipped_dir or SHIPPED_DIR
    name = f"{kind}-{key}"
    entry = read_manifest(shipped_dir)["entries"].get(name)
    if entry is None:
        return None
    return os.path.join(shipped_dir, name), entry


def verify_shipped(path: str, entry: dict[str, Any]) -> None:
    """Raises `loading.WeightsError` naming the first file of the shipped
    snapshot at `path` that is missing, extra or whose sha256 differs from
    the manifest's."""
    fix = ("The installed ssr_jax is damaged or was edited: restore it "
           "(`git checkout -- ssr_jax/pretrain/shipped` or reinstall), "
           "rebuild the shipped snapshots with `python -m "
           "ssr_jax.pretrain.ship --config <config> --write`, or train the "
           "encoders instead with --config.pretrain.force=True.")
    want = entry["files"]
    have = set(os.listdir(path)) if os.path.isdir(path) else set()
    for name in sorted(want):
        f = os.path.join(path, name)
        if name not in have or not os.path.isfile(f):
            raise loading.WeightsError(
                f"shipped encoder file {f} is missing. {fix}")
        got = file_sha256(f)
        if got != want[name]:
            raise loading.WeightsError(
                f"shipped encoder file {f} has sha256 {got}, the manifest "
                f"({MANIFEST_FILE}) records {want[name]}. {fix}")
    extra = sorted(have - set(want))
    if extra:
        raise loading.WeightsError(
            f"shipped encoder {path} holds files the manifest does not "
            f"list: {', '.join(extra)}. {fix}")


def _install_shipped(src: str, entry: dict[str, Any], dst: str) -> None:
    os.makedirs(dst)
    for name in sorted(entry["files"]):  # pretrain.json among them
        shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))


# --- the cache ----------------------------------------------------------------


def _cached(kind: str, train_fn: Callable[[str], dict[str, Any]], key: str,
            cache_dir: str, force: bool = False,
            shipped_dir: str | None = None) -> str:
    """The complete entry `<cache_dir>/<kind>-<key>`, made if absent in a
    temporary sibling and renamed into place: copied from the shipped
    snapshot of the same kind and key (checked against the manifest's
    sha256 first) or, when none ships, trained by `train_fn(tmp_dir)`.
    `force`: train even when the entry is cached or shipped, replacing
    the cached one."""
    final = os.path.join(cache_dir, f"{kind}-{key}")
    if not force and is_complete(final, key):
        logging.info("reusing cached %s encoder %s", kind, final)
        return final
    shipped = None if force else shipped_entry(kind, key, shipped_dir)
    if shipped is not None:
        verify_shipped(*shipped)
    os.makedirs(cache_dir, exist_ok=True)
    tag = (f"{socket.gethostname()}-{os.getpid()}-"
           f"{uuid.uuid4().hex[:8]}")
    tmp = os.path.join(cache_dir, f".{kind}-{key}.tmp-{tag}")
    old = os.path.join(cache_dir, f".{kind}-{key}.old-{tag}")
    try:
        if shipped is not None:
            logging.info("using the shipped %s encoder %s (sha256 checked "
                         "against %s) -> %s", kind, shipped[0],
                         MANIFEST_FILE, final)
            _install_shipped(*shipped, tmp)
        else:
            if force:
                logging.info("pretrain.force: training the %s encoder %s",
                             kind, final)
            info = train_fn(tmp)
            info.update(kind=kind, key=key)
            with open(os.path.join(tmp, INFO_FILE), "w") as f:
                json.dump(info, f, indent=2, sort_keys=True)
        if os.path.isdir(final) and (force or not is_complete(final, key)):
            # a leftover that is not a complete entry, or the entry `force`
            # replaces: moved aside, then deleted
            os.rename(final, old)
        try:
            os.rename(tmp, final)
        except OSError:
            if not is_complete(final, key):  # else: another process won
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return final


def ensure_encoders(config: config_dict.ConfigDict, root: str,
                    cache_dir: str | None = None, *,
                    force: bool | None = None,
                    shipped_dir: str | None = None) -> tuple[str, str]:
    """(clip_path, dino_path): HF snapshot directories of the tiny encoders
    for the world at `root`; dino_path holds the affinity encoder of
    `model.dino_kind` (a DINO ViT or a DINOv2).

    Each encoder is cached on its own key (`cache_key`), so a change to the
    CLIP section does not retrain DINO. On a cache miss the shipped
    snapshot of the same kind and key (`SHIPPED_DIR`, docs/pretrain.md
    "Shipped encoders") is checked against its manifest and copied in;
    only when none ships is the encoder pretrained. `force` (default
    `pretrain.force`) trains both encoders even when cached or shipped,
    replacing the cache entries. `cache_dir` defaults to
    `encoder_cache_dir(config)`, `shipped_dir` to `SHIPPED_DIR`.
    """
    problems = validate(config)
    if problems:
        raise config_check.ConfigError("bad pretraining config:\n  "
                                       + "\n  ".join(problems))
    cache_dir = cache_dir or encoder_cache_dir(config)
    if force is None:
        force = bool(config.pretrain.get("force", False))
    progress = bool(config.pretrain.progress)
    clip_path = _cached(
        "clip", lambda d: pretrain_clip(config, root, d, progress),
        cache_key(config, "clip", root), cache_dir, force, shipped_dir)
    kind = affinity_kind(config)
    dino_path = _cached(
        kind, lambda d: pretrain_dino(config, root, d, progress),
        cache_key(config, kind, root), cache_dir, force, shipped_dir)
    return clip_path, dino_path
