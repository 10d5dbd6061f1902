"""The seed report's rows and its text (`pretrain_report.seed_report`).

The Table 3 row names the seed report scores (`STEPS`, `ORACLE_STEPS`,
`ORACLE_CAM_STEPS`, `CMPA_STEPS`) and the printing of both reports:
`format_report` (zero-shot AUC + seeds), `format_seed_diagnostics` (also
printed by the embedded default's `eval.diagnostics`) and `format_table3`.
Plain functions of the report dicts; nothing here loads a model.
"""

from __future__ import annotations

from typing import Any

STEPS = ("initial", "clip_attn", "clip_dino", "sgc")
# Table 3 rows with the affinity replaced by the ground-truth oracle
# (`diagnostics.oracle_affinity` of the patch labels): propagation with a
# perfect affinity, box mask / superpixel mask (issue 10).
ORACLE_STEPS = ("oracle_attn", "oracle_attn_sgc")
# Table 3 rows with the initial CAM replaced by the ground truth at the
# patch grid (`diagnostics.oracle_cams`, a soft map), then refined by the
# learned affinities as usual: each step's effect with the CAM held ideal.
ORACLE_CAM_STEPS = ("oracle_cam", "oracle_cam_clip_attn",
                    "oracle_cam_clip_dino", "oracle_cam_sgc")
# The initial CAM through CMPA heads trained on ground-truth-masked pooled
# features (`diagnostics_cmpa.train_heads_on_pools`, the oracle CMPA), and
# through the same heads untrained (step 0), beside "initial" (plain CLIP);
# "bn_only": the same training at lr 0 (only BatchNorm's running statistics
# move); "bgneg": with the background prompts as extra InfoNCE negatives;
# "bgpool": with the background-pool term (`cmpa.background_pool`).
CMPA_STEPS = ("cmpa_oracle", "cmpa_oracle_bn_only", "cmpa_oracle_bgneg",
              "cmpa_oracle_bgpool", "cmpa_untrained")
# Fixed learned pools for the CMPA heads (`pretrain_report --cmpa_pools`):
# rows cmpa_<source>pool and cmpa_<source>pool_bgpool.
CMPA_POOL_SOURCES = ("cam", "refined")


def pool_source_rows(source: str) -> tuple[str, str]:
    """The two report rows of heads trained on `source` pools (plain CMPA,
    and with the background-pool term)."""
    return f"cmpa_{source}pool", f"cmpa_{source}pool_bgpool"


def format_report(zs: dict[str, Any], seeds: dict[str, Any]) -> str:
    """A short text summary of both reports."""
    return "\n".join([
        f"CLIP zero-shot AUC on val ({zs['num_images']} images): "
        f"classes {zs['fg_auc_cls']:.3f} (CLS) / {zs['fg_auc_patch']:.3f} "
        f"(patch mean), backgrounds {zs['bg_auc_cls']:.3f} / "
        f"{zs['bg_auc_patch']:.3f}", format_seed_diagnostics(seeds)])


def format_seed_diagnostics(seeds: dict[str, Any]) -> str:
    """The seed report's lines (mIoU per step, purity, CAM errors,
    boundary recall)."""
    lines = [
        f"CAM seeds on train ({seeds['num_images']} images), mIoU %: "
        + ", ".join(f"{k} {100 * v:.1f}" for k, v in seeds["miou"].items()),
        "same-label attention share [bg, fg query patches]: "
        + ", ".join(f"{k} [{v[0]:.2f}, {v[1]:.2f}]"
                    for k, v in seeds["purity"].items()),
    ]
    e = seeds.get("initial_cam_errors")
    if e and e["precision"] is not None:
        fp = e["fp_share"]
        lines.append(
            f"initial CAM precision {e['precision']:.3f} / recall "
            f"{e['recall']:.3f}; false positives on the class's home "
            f"background {fp['home_bg'] or 0:.3f}, other background "
            f"{fp['other_bg'] or 0:.3f}, other objects {fp['object'] or 0:.3f}")
    table = format_table3(seeds["miou"])
    if table:
        lines.append(table)
    o = seeds.get("oracle_cmpa")
    if o:
        lines.append(
            f"oracle CMPA heads ({o['steps']} steps, batch {o['batch']}, "
            f"lr {o['lr']:g}, GT pools): loss {o['first_loss']:.3f} -> "
            f"{o['last_loss']:.3f}, acc {o['first_acc']:.2f} -> "
            f"{o['last_acc']:.2f}, tau {o['tau']:.3f}")
    if seeds.get("mask_grid"):
        lines.append(format_mask_grid(seeds["mask_grid"]))
    if seeds.get("affinity_mix"):
        lines.append(format_affinity_mix(seeds["affinity_mix"]))
    if seeds.get("cam_mix"):
        lines.append(format_cam_mix(seeds["cam_mix"]))
    if seeds.get("affinity_levers"):
        lines.append(format_affinity_levers(seeds["affinity_levers"]))
    if "boundary_recall" in seeds:
        lines.append("superpixel boundary recall: " + ", ".join(
            f"{k} {v:.3f}" for k, v in seeds["boundary_recall"].items()))
    return "\n".join(lines)


def format_table3(miou: dict[str, float]) -> str:
    """Table 3 rows (mIoU %) with the affinity or the initial CAM held
    ideal, and the initial CAM with / without the oracle CMPA; "" when the
    rows are absent."""
    rows = [("learned (as the run)", ("initial",) + STEPS[1:]),
            ("oracle initial CAM", ORACLE_CAM_STEPS)]
    if not all(k in miou for _, ks in rows for k in ks):
        return ""

    def cell(k):
        return f"{100 * miou[k]:6.1f}" if k in miou else "     -"
    out = ["Table 3 rows, mIoU %:     initial  +CLIP  +DINO   +SGC",
           *(f"  {name:<22} " + " ".join(cell(k) for k in ks)
             for name, ks in rows),
           f"  {'oracle affinity':<22}      -      - "
           + cell("oracle_attn") + " " + cell("oracle_attn_sgc")
           + "   (box / SGC mask, no DINO)"]
    if all(k in miou for k in CMPA_STEPS):
        out.append(f"initial CAM: plain CLIP {cell('initial').strip()}, "
                   f"CMPA heads untrained {cell('cmpa_untrained').strip()}, "
                   f"oracle CMPA (GT pools) {cell('cmpa_oracle').strip()} "
                   f"(BN statistics only "
                   f"{cell('cmpa_oracle_bn_only').strip()}, background "
                   f"negatives {cell('cmpa_oracle_bgneg').strip()}, "
                   f"background pool "
                   f"{cell('cmpa_oracle_bgpool').strip()})")
    for source, what in zip(CMPA_POOL_SOURCES, ("the plain initial CAM",
                                                "the +SGC CAM"), strict=True):
        row, bg_row = pool_source_rows(source)
        if row in miou:
            out.append(f"  heads on pools under {what} (fixed): "
                       f"{cell(row).strip()}, with background pool "
                       f"{cell(bg_row).strip()}")
    return "\n".join(out)


def format_mask_grid(grid: list[dict[str, Any]]) -> str:
    """The target-zone mask grid (`pretrain_report.mask_grid_settings`):
    per setting, object recall / background rejection of the mask made
    from the learned CAM (pixels, and weighted by that CAM's mass) and
    from the oracle CAM, and the seed mIoU % of the
    rows that use it (learned CAM + CLIP/DINO, learned CAM + oracle
    affinity, oracle CAM + CLIP/DINO)."""
    def pct(x):
        return "   -" if x is None else f"{100 * x:4.0f}"

    out = ["target-zone masks (object recall / background rejection %, "
           "pixels and CAM mass; mIoU %):",
           f"  {'mask':<34} {'learned CAM':>11} {'CAM mass':>11} "
           f"{'oracle CAM':>11} {'learned':>8} {'or.attn':>8} {'or.CAM':>8}"]
    for g in grid:
        if g["mask"] == "box":
            name = f"box thr {g['threshold']:g}"
        else:
            name = (f"sgc {g['kmeans_init']} k{g.get('colour_k', '?')} "
                    f"h{g['theta_h']:g} r{g['theta_r']:g}")
        lc, oc, m = g["learned_cam"], g["oracle_cam"], g["miou"]
        wc = g.get("learned_cam_mass", {"object_recall": None,
                                        "background_rejection": None})
        out.append(
            f"  {name:<34} {pct(lc['object_recall'])} / "
            f"{pct(lc['background_rejection'])} "
            f"{pct(wc['object_recall'])} / "
            f"{pct(wc['background_rejection'])} "
            f"{pct(oc['object_recall'])} / {pct(oc['background_rejection'])}"
            f" {100 * m['learned']:8.1f} {100 * m['oracle_attn']:8.1f} "
            f"{100 * m['oracle_cam']:8.1f}")
    return "\n".join(out)


def format_cam_mix(mix: dict[str, Any]) -> str:
    """The initial-CAM threshold (`pretrain_report.cam_mix_summary`)."""
    beta = mix.get("affinity_alpha", 0.0)
    beta_d = mix.get("affinity_alpha_dino", beta)
    moved = ""
    if beta or beta_d:
        moved = (f", A_CLIP and A_DINO moved toward it by {beta:g}"
                 if beta == beta_d else
                 f", A_CLIP moved toward it by {beta:g} and A_DINO by "
                 f"{beta_d:g}")
    lines = ["Table 3 rows with the initial CAM moved toward the oracle "
             "((1-a)·learned + a·oracle)" + moved + ", mIoU %:",
             "     a   initial  +CLIP  +DINO   +SGC"]
    for p in mix["points"]:
        m = p["miou"]
        lines.append(f"  {p['alpha']:4.2f}  " + "  ".join(
            f"{100 * m[k]:6.1f}" for k in ("initial_cam", "clip_attn",
                                            "clip_dino", "sgc")))
    for name, hit in mix["first_holds"].items():
        lines.append(f"  {name}: " + (
            "holds at no a" if hit is None else
            f"holds from a {hit['alpha']:.2f} (initial CAM "
            f"{100 * hit['initial_cam']:.1f})"))
    return "\n".join(lines)


def format_affinity_mix(mix: dict[str, Any]) -> str:
    """The purity threshold (`pretrain_report._affinity_mix_summary`): per
    base affinity and α, [bg, fg] purity of the mixed affinity and of its
    transition matrix, the box-mask mIoU on the learned and on the oracle
    CAM, then where each first beats its initial CAM."""
    lines = [f"affinity mixed toward the oracle, (1-a)*A + a*oracle "
             f"({mix['scaling']}); box mask; mIoU %:"]
    for base in ("clip", "fused", "dino"):
        if base not in mix:
            continue
        ref = "+CLIP attention" if base == "dino" else "its initial CAM"
        what = (" (A_DINO mixed, fused with the learned A_CLIP; purity of "
                "the mixed A_DINO)" if base == "dino" else "")
        lines.append(f"  {base}{what}: alpha | purity [bg, fg] | "
                     "transition [bg, fg] | learned CAM | oracle CAM")
        for p in mix[base]["points"]:
            a, t = p["purity"], p["purity_transition"]
            lines.append(
                f"    {p['alpha']:.2f} | [{a[0]:.2f}, {a[1]:.2f}] | "
                f"[{t[0]:.2f}, {t[1]:.2f}] | {100 * p['miou']['learned']:.1f}"
                f" | {100 * p['miou']['oracle_cam']:.1f}")
        for row, thr in mix[base]["threshold"].items():
            f = thr["fg_purity"]
            if f["alpha_star"] is None:
                lines.append(f"    {row}: never beats {ref} "
                             f"({100 * thr['initial']:.1f})")
                continue
            ft = thr["fg_purity_transition"]
            lines.append(
                f"    {row}: beats {ref} ({100 * thr['initial']:.1f})"
                f" first at alpha {f['alpha_star']:.2f} (fg purity "
                f"{f['purity_star']:.2f}); interpolated crossing alpha "
                f"{f['alpha_cross']:.2f}, fg purity {f['purity_cross']:.2f} "
                f"(transition {ft['purity_cross']:.2f}), bg purity "
                f"{thr['bg_purity']['purity_cross']:.2f}")
    return "\n".join(lines)


def format_affinity_levers(levers: list[dict[str, Any]]) -> str:
    """The CLIP affinity's levers (`pretrain_report._levers`): per
    (clip_layers, Sinkhorn rounds, power), fg purity of the CLIP / fused
    affinity and of their transitions, and the box-mask rows."""
    lines = ["CLIP affinity levers (box mask; fg purity: CLIP, its "
             "transition, fused, its transition; mIoU %: +CLIP, +DINO, "
             "oracle CAM +CLIP; +DINO with A_DINO := oracle, DINO with "
             "CLIP's saliency, oracle with CLIP's saliency, DINO without "
             "its diagonal):"]
    for g in levers:
        p, m = g["purity"], g["miou"]
        lines.append(
            f"  layers {g['clip_layers']} sinkhorn {g['sinkhorn_iters']} "
            f"power {g['transition_power']}: "
            + " ".join(f"{p[k][1]:.2f}" for k in (
                "clip", "clip_transition", "fused", "fused_transition"))
            + " | " + " ".join(f"{100 * m[r]:.1f}" for r in (
                "clip_attn", "clip_dino", "oracle_cam_clip_attn"))
            + " | " + " ".join(f"{100 * m[r]:.1f}" for r in (
                "clip_oracle_dino", "clip_salient_dino",
                "clip_salient_oracle_dino", "clip_offself_dino") if r in m))
    return "\n".join(lines)
