"""The oracle CMPA of the seed report (`pretrain_report.seed_report`).

`oracle_cmpa_heads`: CMPA heads trained on ground-truth-masked pooled
features of the scored images (`diagnostics_cmpa.train_heads_on_pools`
with the run's `cmpa.*` settings and budget), with its controls
(untrained, lr 0, background negatives); `cmpa_cam_fn`: the initial CAM
through such heads, scored as a confusion matrix (rows
`report_format.CMPA_STEPS`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from ml_collections import config_dict

from ssr_jax import cam as cam_lib
from ssr_jax import diagnostics_cmpa, metrics, pretrain, ssr
from ssr_jax import par as par_lib
from ssr_jax.models.clip import CLIP
from ssr_jax.report_format import pool_source_rows

Array = jax.Array


def cmpa_cam_fn(clip: CLIP, config: config_dict.ConfigDict,
                text_fg: Array, text_bg: Array, logit_scale: float):
    """Jitted (heads state, batch) → confusion [C, C] of the initial CAM
    projected through CMPA heads (running BN statistics, as
    `ssr.initial_cams` reads them in the run)."""
    cg, cs = nnx.split(clip)
    num_classes = config.data.num_classes
    kmax = config.data.max_classes_per_image
    clip_norm = config.pretrain.clip.normalization

    @functools.partial(jax.jit, static_argnums=0)
    def fn(hg, hs, cs, batch):
        clip = nnx.merge(cg, cs)
        heads = nnx.merge(hg, hs)
        image = batch["image"]
        x11, _, grid = ssr.clip_trunk(
            clip, pretrain.normalise(image.astype(jnp.float32), clip_norm))
        cls_ids = cam_lib.present_classes(batch["labels"], kmax)
        cams, _ = ssr.initial_cams(clip, x11, cls_ids, grid, text_fg,
                                   text_bg, config, heads,
                                   logit_scale=logit_scale)
        _, labels = par_lib.cams_to_labels(cams, cls_ids, image.shape[1:3])
        gt = jnp.where(batch["example_valid"][:, None, None],
                       batch["mask"].astype(jnp.int32),
                       config.data.ignore_index)
        return metrics.confusion_matrix_jnp(labels, gt, num_classes,
                                            config.data.ignore_index)

    def run(heads, batch):
        hg, hs = nnx.split(heads)
        return fn(hg, hs, cs, batch)
    return run


def oracle_cmpa_heads(config: config_dict.ConfigDict, pool: dict[str, Any],
                      text_fg: Array, text_bg: Array,
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The oracle CMPA: heads trained on GT-masked pooled features.

    `diagnostics_cmpa.train_heads_on_pools` on the seed images' projected
    patch tokens pooled under `diagnostics.oracle_cams`, with the run's head
    settings (`cmpa.*`) and budget (`train.num_steps` × `train.batch_size`
    at a constant `optim.lr` × `optim.heads_lr_mult`, the heads' own lr in
    the run, `train.create_optimizer`), the image's class as the positive.

    Returns:
      ({"cmpa_oracle": trained heads, "cmpa_oracle_bn_only": trained at lr
      0, "cmpa_oracle_bgneg": trained with `cmpa.background_negatives`,
      "cmpa_oracle_bgpool": trained with `cmpa.background_pool` (the
      term at `cmpa.background_pool_weight`), "cmpa_untrained": the same
      heads at step 0}, {"first_loss", "last_loss", "first_acc",
      "last_acc", "tau", "steps", "lr", "heads_lr_mult", "batch",
      "variant", "positive", "bgneg_last_loss", "bgpool_last_loss",
      "bgpool_last_acc", "bgpool_first_bg_loss", "bgpool_last_bg_loss"}).
    """
    kw = _heads_kwargs(config)
    args = (pool["tokens"], pool["pools"], pool["cls_ids"], text_fg,
            text_bg)
    trained, log = diagnostics_cmpa.train_heads_on_pools(
        *args, token_valid=pool["token_valid"], **kw)
    untrained, _ = diagnostics_cmpa.train_heads_on_pools(
        *args, token_valid=pool["token_valid"], **{**kw, "steps": 0})
    bn_only, _ = diagnostics_cmpa.train_heads_on_pools(
        *args, token_valid=pool["token_valid"], **{**kw, "lr": 0.0})
    bgneg, log_bg = diagnostics_cmpa.train_heads_on_pools(
        *args, token_valid=pool["token_valid"],
        **{**kw, "bg_negatives": True})
    bgpool, log_bp = diagnostics_cmpa.train_heads_on_pools(
        *args, token_valid=pool["token_valid"], **{**kw, "bg_pool": True})
    info = {"first_loss": log["loss"][0] if log["loss"] else None,
            "last_loss": log["loss"][-1] if log["loss"] else None,
            "first_acc": log["acc"][0] if log["acc"] else None,
            "last_acc": log["acc"][-1] if log["acc"] else None,
            "tau": log["tau"], "steps": kw["steps"], "lr": kw["lr"],
            "heads_lr_mult": float(config.optim.get("heads_lr_mult", 1.0)),
            "bgpool_last_loss": log_bp["loss"][-1] if log_bp["loss"]
            else None,
            "bgpool_last_acc": log_bp["acc"][-1] if log_bp["acc"] else None,
            "bgpool_first_bg_loss": log_bp["bg_loss"][0]
            if log_bp["bg_loss"] else None,
            "bgpool_last_bg_loss": log_bp["bg_loss"][-1]
            if log_bp["bg_loss"] else None,
            "batch": kw["batch"], "variant": kw["variant"],
            "positive": "class",
            "bgneg_last_loss": log_bg["loss"][-1] if log_bg["loss"]
            else None}
    return {"cmpa_oracle": trained, "cmpa_oracle_bn_only": bn_only,
            "cmpa_oracle_bgneg": bgneg, "cmpa_oracle_bgpool": bgpool,
            "cmpa_untrained": untrained}, info


def pooled_cmpa_heads(config: config_dict.ConfigDict, pool: dict[str, Any],
                      text_fg: Array, text_bg: Array, source: str,
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Heads trained as the oracle CMPA's, on pools under a fixed learned
    CAM instead of the ground truth: `pool[f"pools_{source}"]` (the report
    fills "cam", the plain initial CAM, and "refined", the Table 3 "+SGC"
    CAM that the run's PAR reads). Beside the GT-pool rows this separates
    the pools' quality from the run's self-feeding loop (there the CAM that
    pools comes from the heads being trained).

    Returns:
      ({`pool_source_rows(source)`[0]: heads, [1]: heads with the
      background-pool term}, {"last_loss", "last_acc", "bgpool_last_loss"}).
    """
    kw = _heads_kwargs(config)
    args = (pool["tokens"], pool[f"pools_{source}"], pool["cls_ids"],
            text_fg, text_bg)
    plain, log = diagnostics_cmpa.train_heads_on_pools(
        *args, token_valid=pool["token_valid"], **kw)
    bgpool, log_bp = diagnostics_cmpa.train_heads_on_pools(
        *args, token_valid=pool["token_valid"], **{**kw, "bg_pool": True})
    rows = pool_source_rows(source)
    return {rows[0]: plain, rows[1]: bgpool}, {
        "last_loss": log["loss"][-1] if log["loss"] else None,
        "last_acc": log["acc"][-1] if log["acc"] else None,
        "bgpool_last_loss": log_bp["loss"][-1] if log_bp["loss"] else None}


def _heads_kwargs(config: config_dict.ConfigDict) -> dict[str, Any]:
    """`train_heads_on_pools` settings of the run: head shapes, budget, the
    heads' own lr, the CMPA choices."""
    p = config.cmpa
    return dict(steps=int(config.train.num_steps),
                batch=int(config.train.batch_size),
                lr=float(config.optim.lr)
                * float(config.optim.get("heads_lr_mult", 1.0)),
                hidden_dim=p.hidden_dim, dim=p.dim, tau_init=p.tau_init,
                tau_min=p.tau_min, tied_init=p.get("tied_init", True),
                identity_init=p.get("identity_init", False),
                variant=p.variant if p.variant != "none" else "cross",
                bg_negatives=p.get("background_negatives", False),
                bg_pool=p.get("background_pool", False),
                bg_pool_weight=float(p.get("background_pool_weight", 1.0)),
                seed=int(config.get("seed", 0)))
