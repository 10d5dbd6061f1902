"""The pretraining config check and the snapshot cache: `ensure_encoders`
caches each snapshot under a hash of (its kind, its config section, the
world's `world.json`, `PRETRAIN_VERSION`); an entry is written to a
temporary directory and renamed into place, so an interrupted run never
leaves a snapshot that looks complete.

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


def _cached(kind: str, train_fn: Callable[[str], dict[str, Any]], key: str,
            cache_dir: str) -> str:
    """The complete entry `<cache_dir>/<kind>-<key>`, trained by
    `train_fn(tmp_dir)` into a temporary sibling and renamed into place if
    absent."""
    final = os.path.join(cache_dir, f"{kind}-{key}")
    if is_complete(final, key):
        logging.info("reusing cached %s encoder %s", kind, final)
        return final
    os.makedirs(cache_dir, exist_ok=True)
    tmp = os.path.join(cache_dir, f".{kind}-{key}.tmp-{socket.gethostname()}"
                       f"-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        info = train_fn(tmp)
        info.update(kind=kind, key=key)
        with open(os.path.join(tmp, INFO_FILE), "w") as f:
            json.dump(info, f, indent=2, sort_keys=True)
        if os.path.isdir(final) and not is_complete(final, key):
            shutil.rmtree(final)  # a leftover that is not a complete entry
        try:
            os.rename(tmp, final)
        except OSError:
            if not is_complete(final, key):  # else: another process won
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def ensure_encoders(config: config_dict.ConfigDict, root: str,
                    cache_dir: str | None = None) -> tuple[str, str]:
    """(clip_path, dino_path): HF snapshot directories of the tiny encoders
    for the world at `root`, pretrained on a cache miss; dino_path holds the
    affinity encoder of `model.dino_kind` (a DINO ViT or a DINOv2).

    Each encoder is cached on its own key (`cache_key`), so a change to the
    CLIP section does not retrain DINO. `cache_dir` defaults to
    `encoder_cache_dir(config)`.
    """
    problems = validate(config)
    if problems:
        raise ValueError("bad pretraining config:\n  "
                         + "\n  ".join(problems))
    cache_dir = cache_dir or encoder_cache_dir(config)
    progress = bool(config.pretrain.progress)
    clip_path = _cached(
        "clip", lambda d: pretrain_clip(config, root, d, progress),
        cache_key(config, "clip", root), cache_dir)
    kind = affinity_kind(config)
    dino_path = _cached(
        kind, lambda d: pretrain_dino(config, root, d, progress),
        cache_key(config, kind, root), cache_dir)
    return clip_path, dino_path
