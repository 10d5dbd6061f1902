"""Config → method arguments, in one place.

The method modules (cam, cmpa, sgc, sgc_mask, par, losses, segment_ops)
take plain arguments and frozen dataclasses of plain fields, never a
ConfigDict (tests/test_method_params.py checks it). `method_params(config)`
is the one function that reads the run config's method sections into those
values; the composition (`ssr.py`) and the assembly layer (pretrain report,
benchmarks) call it instead of reading `config.sgc` & co. field by field.

    mp = method_params(config)
    sgc.refine_cams_with(cams, slot_valid, mp.sgc, clip_attn=..., ...)
    cmpa.CMPAHeads.from_params(mp.cmpa, image_dim, text_dim, rngs=rngs)
    par.pseudo_labels(cams, cls_ids, pixels, valid, **mp.par.knobs())
    losses.total_loss(parts, mp.loss)

Fields a config may lack (older saved configs) take the defaults the
method modules document; config_check validates the values.
"""

from __future__ import annotations

import dataclasses

from ssr_jax import cmpa, losses, par, sgc


@dataclasses.dataclass(frozen=True)
class MethodParams:
    """The method's knobs of one run config.

    sgc: `sgc.SGCParams` (Eq. 7-11), from `config.sgc`.
    cmpa: `cmpa.CMPAParams` (Eq. 1-6), from `config.cmpa`.
    par: `par.PARParams` (SPEC 1.7), from `config.par`.
    loss: `losses.LossWeights` (Eq. 12), from `config.loss`.
    """

    sgc: sgc.SGCParams
    cmpa: cmpa.CMPAParams
    par: par.PARParams
    loss: losses.LossWeights


def method_params(config) -> MethodParams:
    """Reads `config.sgc`, `config.cmpa`, `config.par` and `config.loss`.

    Values are passed through as the config holds them (no casts), so the
    traced computation is the one the config gave before this layer
    existed; `par.dilations` becomes a tuple.
    """
    s, p, r, lo = config.sgc, config.cmpa, config.par, config.loss
    return MethodParams(
        sgc=sgc.SGCParams(
            use_clip_attn=s.use_clip_attn, use_dino_attn=s.use_dino_attn,
            mask_kind=s.mask, clip_layers=s.clip_layers,
            clip_weight=s.clip_weight, dino_weight=s.dino_weight,
            sinkhorn_iters=s.sinkhorn_iters,
            transition_power=s.get("transition_power", 2),
            box_threshold=s.box_threshold,
            colour_k=s.colour_k, colour_iters=s.colour_iters,
            colour_space=s.colour_space, theta_h=s.theta_h,
            theta_r=s.theta_r, patch_fraction=s.patch_fraction,
            num_segments=s.max_segments,
            impl=s.get("segment_impl", "segment"),
            kmeans_init=s.get("kmeans_init", "lightness_ranks"),
            kmeans_seed=s.get("kmeans_seed", 0),
            position_weight=s.get("position_weight", 0.0),
            ratio_denominator=s.get("ratio_denominator", "cluster"),
            zone_unit=s.get("zone_unit", "cluster"),
            intersect_box=s.get("intersect_box", False)),
        cmpa=cmpa.CMPAParams(
            variant=p.variant, hidden_dim=p.hidden_dim, dim=p.dim,
            tau_init=p.tau_init, tau_min=p.tau_min,
            tied_init=p.get("tied_init", True),
            identity_init=p.get("identity_init", False),
            positive=p.positive,
            background_negatives=p.get("background_negatives", False),
            valid_tokens_only=p.get("valid_tokens_only", False),
            background_pool=p.get("background_pool", False),
            background_pool_weight=p.get("background_pool_weight", 1.0),
            num_prototypes=p.num_prototypes, kmeans_iters=p.kmeans_iters,
            bank_size=p.bank_size, recluster_every=p.recluster_every,
            pool_source=p.get("pool_source", "live"),
            pool_ema_decay=p.get("pool_ema_decay", 0.99)),
        par=par.PARParams(
            iters=r.iters, dilations=tuple(r.dilations),
            pos_weight=r.pos_weight, temperature=r.temperature,
            bg_power=r.bg_power),
        loss=losses.LossWeights(
            proto_weight=lo.proto_weight, seg_weight=lo.seg_weight,
            aff_weight=lo.aff_weight))
