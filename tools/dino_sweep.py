"""Pretrain DINO variants side by side and compare them with
`ssr_jax.pretrain_report` (issue 10: the DINO fusion step).

Each variant is a name and config overrides; every variant runs
`python -m ssr_jax.pretrain_report --config CONFIG <overrides>` in its own
process (several at once with --jobs), with its own encoder cache under
--work (seeded with the entries of --seed_cache, e.g. the cached CLIP, so
that only what a variant changes is trained), then one table compares the
DINO encoders (teacher entropy: collapse at ln K; foreground attention
purity of every block) and the train-split seed rows (initial CAM, +CLIP
attention, +DINO, +SGC).

    python tools/dino_sweep.py --config configs/synthetic.py \\
        --variant base: \\
        --variant ibot:pretrain.dino.ibot_weight=1 \\
        --variant long:pretrain.dino.steps=1500,pretrain.dino.lr=5e-4 \\
        --jobs 3 --work /tmp/sweep --out /tmp/sweep/summary.json \\
        --report_args=--nooracle_cmpa,--max_images=500

`--tar FILE` packs every variant's trained affinity-encoder snapshot
(`dino-<key>` / `dinov2-<key>`, not the seeded ones) into one tar file.
The world comes from the config as usual ($XDG_CACHE_HOME).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from absl import app

ROWS = ("initial", "clip_attn", "clip_dino", "sgc")


def parse_variant(text: str) -> tuple[str, list[str]]:
    """'name:a.b=1,c=2' → ('name', ['--config.a.b=1', '--config.c=2'])."""
    name, sep, rest = text.partition(":")
    if not sep or not name or not name.replace("_", "").replace(
            "-", "").replace(".", "").isalnum():
        raise ValueError(f"--variant={text!r}: write NAME:key=value,... "
                         "(NAME of letters, digits, _ - .)")
    overrides = []
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"--variant={text!r}: {item!r} is not "
                             "key=value")
        overrides.append(f"--config.{key}={value}")
    return name, overrides


def run_variant(name: str, overrides: list[str], work: str,
                seed_cache: str, config: str,
                report_args: Sequence[str]) -> dict[str, Any]:
    """Runs pretrain_report for one variant in its own encoder cache (seeded
    with copies of `seed_cache`'s entries); the result with its report."""
    cache = os.path.join(work, "cache", name)
    os.makedirs(cache, exist_ok=True)
    seeded = set()
    if seed_cache:
        for entry in os.listdir(seed_cache):
            src = os.path.join(seed_cache, entry)
            if entry.startswith(".") or not os.path.isdir(src):
                continue
            seeded.add(entry)
            if not os.path.exists(os.path.join(cache, entry)):
                shutil.copytree(src, os.path.join(cache, entry))
    out = os.path.join(work, f"{name}.json")
    cmd = [sys.executable, "-m", "ssr_jax.pretrain_report",
           f"--config={config}", *overrides,
           f"--config.pretrain.cache_dir={cache}", "--config.pretrain."
           "progress=False", f"--out={out}", *report_args]
    start = time.perf_counter()
    with open(os.path.join(work, f"{name}.log"), "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
    result = {"name": name, "overrides": overrides, "rc": rc,
              "seconds": round(time.perf_counter() - start, 1),
              "cache": cache, "seeded": sorted(seeded)}
    if rc == 0:
        with open(out) as f:
            result["report"] = json.load(f)
    return result


def summarise(r: dict[str, Any]) -> dict[str, Any]:
    """The table row of one variant."""
    row: dict[str, Any] = {"name": r["name"], "rc": r["rc"],
                           "seconds": r["seconds"]}
    rep = r.get("report")
    if not rep:
        return row
    d = rep["encoders"]["dino"]
    row["dino"] = {k: d.get(k) for k in (
        "key", "steps", "seconds", "first_loss", "final_loss",
        "final_patch_loss", "teacher_entropy", "teacher_mean_entropy")}
    seeds = next(v for k, v in rep.items() if k.startswith("seeds_scale_"))
    row["miou"] = {k: seeds["miou"].get(k) for k in ROWS}
    pur = seeds.get("purity", {})
    row["purity_fg"] = {k: v[1] for k, v in pur.items()
                        if k.startswith(("dino", "clip")) and
                        isinstance(v, list)}
    return row


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["variant          steps  H_t   H_mean  fg purity (dino last; "
             "blocks)          initial  +CLIP  +DINO  +SGC   DINO-CLIP  s"]
    for r in rows:
        if "miou" not in r:
            lines.append(f"{r['name']:16s} FAILED (rc {r['rc']}), see "
                         f"{r['name']}.log")
            continue
        d, m, p = r["dino"], r["miou"], r["purity_fg"]
        blocks = " ".join(f"{p[k]:.2f}" for k in sorted(p)
                          if k.startswith("dino_block"))
        lines.append(
            f"{r['name']:16s} {d['steps']:5d}  {d['teacher_entropy']:.2f}  "
            f"{d['teacher_mean_entropy']:.2f}    {p.get('dino', 0):.3f} "
            f"({blocks:24s})  {100 * m['initial']:6.1f}  "
            f"{100 * m['clip_attn']:5.1f}  {100 * m['clip_dino']:5.1f}  "
            f"{100 * m['sgc']:5.1f}  "
            f"{100 * (m['clip_dino'] - m['clip_attn']):+6.1f}"
            f"  {r['seconds']:.0f}")
    return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise SystemExit(f"dino_sweep: unexpected arguments {argv[1:]}")
    try:
        variants = [parse_variant(v) for v in _VARIANTS.value]
    except ValueError as e:
        raise SystemExit(f"dino_sweep: {e}") from None
    if not variants:
        raise SystemExit("dino_sweep: give at least one --variant")
    names = [n for n, _ in variants]
    if len(set(names)) != len(names):
        raise SystemExit(f"dino_sweep: variant names repeat: {names}")
    if _SEED_CACHE.value and not os.path.isdir(_SEED_CACHE.value):
        raise SystemExit(f"dino_sweep: --seed_cache={_SEED_CACHE.value!r} "
                         "is not a directory")
    work = os.path.abspath(_WORK.value)
    os.makedirs(work, exist_ok=True)
    with ThreadPoolExecutor(max(1, _JOBS.value)) as pool:
        results = list(pool.map(
            lambda v: run_variant(v[0], v[1], work, _SEED_CACHE.value,
                                  _CONFIG.value, _REPORT_ARGS.value),
            variants))
    rows = [summarise(r) for r in results]
    print(format_table(rows))
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump({"config": _CONFIG.value, "rows": rows,
                       "variants": {n: o for n, o in variants}}, f,
                      indent=2)
    if _TAR.value:
        with tarfile.open(_TAR.value, "w") as tar:
            for r in results:
                for entry in sorted(os.listdir(r["cache"])):
                    if (entry.startswith(("dino-", "dinov2-"))
                            and entry not in r["seeded"]):
                        tar.add(os.path.join(r["cache"], entry),
                                arcname=f"{r['name']}/{entry}")
    if any(r["rc"] for r in results):
        raise SystemExit(1)


if __name__ == "__main__":
    from absl import flags

    _CONFIG = flags.DEFINE_string("config", "configs/synthetic.py",
                                  "config file (with an optional :variant)")
    _VARIANTS = flags.DEFINE_multi_string(
        "variant", [], "NAME:key=value,key=value (config overrides without "
        "--config.; NAME: alone = the config as it is)")
    _JOBS = flags.DEFINE_integer("jobs", 1, "variants run at once")
    _WORK = flags.DEFINE_string("work", "dino_sweep", "working directory")
    _SEED_CACHE = flags.DEFINE_string(
        "seed_cache", "", "encoder cache whose entries every variant's cache "
        "starts with (copied), e.g. $XDG_CACHE_HOME/ssr_jax/encoders")
    _REPORT_ARGS = flags.DEFINE_list(
        "report_args", ["--nooracle_cmpa", "--logit_scales=config"],
        "more pretrain_report arguments")
    _OUT = flags.DEFINE_string("out", "", "summary JSON")
    _TAR = flags.DEFINE_string("tar", "", "tar file of the trained snapshots")
    app.run(main)
