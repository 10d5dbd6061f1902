"""SSR put together: frozen encoders → CAM → SGC → PAR → decoder → losses.

The composition of the method modules that `train`, `evaluate` and the
benchmarks share. Everything here runs inside jit:

- `SSRModel`: the trainable parts (WeCLIP decoder, CMPA heads with log τ).
- `pseudo_label_path`: the online pseudo labels (SPEC 1.1–1.7): CLIP blocks
  1..11 (no gradient), GradCAM through block 12 (Eq. 1–2 heads when
  `cam.projected`), CLIP + DINO affinity, superpixel mask, refinement
  (Eq. 7–11), PAR and argmax.
- `loss_fn`: L = L_proto + γ·L_seg (+ optional WeCLIP affinity loss),
  Eq. 12.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ssr_jax import cam as cam_lib
from ssr_jax import cmpa as cmpa_lib
from ssr_jax import losses
from ssr_jax import par as par_lib
from ssr_jax import params as params_lib
from ssr_jax import sgc as sgc_lib
from ssr_jax.models import decoder as decoder_lib
from ssr_jax.models import encoders
from ssr_jax.models.normalize import normalise
from ssr_jax.models.resize import resize

Array = jax.Array
Batch = dict[str, Array]

class SSRModel(nnx.Module):
    """Trainable parts of SSR: the decoder and the CMPA heads (with log τ).

    CLIP and DINO are frozen and live outside this module (and outside the
    optimiser).
    """

    def __init__(self, config, *, clip_width: int, embed_dim: int,
                 rngs: nnx.Rngs):
        dc = config.model.decoder
        self.decoder = decoder_lib.Decoder(
            in_dim=clip_width, num_layers_in=dc.num_layers_in,
            embed_dim=dc.embed_dim, depth=dc.depth, heads=dc.heads,
            num_classes=config.data.num_classes, dropout=dc.dropout,
            rngs=rngs)
        self.heads = cmpa_lib.CMPAHeads.from_params(
            params_lib.method_params(config).cmpa, image_dim=embed_dim,
            text_dim=embed_dim, rngs=rngs)


def _patch_tokens(x: Array) -> Array:
    return x[:, 1:]


def clip_trunk(clip, pixels: Array) -> tuple[Array, dict, tuple[int, int]]:
    """CLIP blocks 1..L−1 without gradient (SPEC 1.1).

    Args:
      clip: the Flax CLIP.
      pixels: [B, H, W, 3] normalised.

    Returns:
      (x [B, T, D] input of the last block, out with every run block's
      "hidden" and "attn", the patch grid (h, w)).
    """
    vision = clip.vision
    n_layers = len(vision.blocks)
    patch = vision.config.patch_size
    grid = (pixels.shape[1] // patch, pixels.shape[2] // patch)
    x, out = vision.run_blocks(vision.embed(pixels), 0, n_layers - 1)
    return jax.lax.stop_gradient(x), out, grid


def gradcam_scale(clip, logit_scale: float):
    """The GradCAM softmax scale that `cam.logit_scale` means: the value
    itself, or for 0 the checkpoint's own learned exp(logit_scale) (a
    float32 scalar; exactly 100 for OpenAI CLIP)."""
    return logit_scale or jnp.exp(clip.logit_scale[...].astype(jnp.float32))


def initial_cams(clip, x11: Array, cls_ids: Array, grid: tuple[int, int],
                 text_fg: Array, text_bg: Array, config, heads=None, *,
                 logit_scale: float | None = None,
                 ) -> tuple[Array, dict[str, Array]]:
    """GradCAM through the last CLIP block (SPEC 1.4), no gradient out.

    Args:
      clip: the Flax CLIP.
      x11: [B, T, D] from `clip_trunk`.
      cls_ids: [B, K] from `cam.present_classes`.
      grid: the patch grid.
      text_fg, text_bg: the text bank.
      config: `cam.target`, `cam.logit_scale` (0 = the checkpoint's
        learned scale) are read.
      heads: `cmpa.CMPAHeads` to project the logits through ISA/TSA
        (running BN statistics, so every image stays independent), or None
        for plain CLIP (Table 4's "without CMPA").
      logit_scale: used as given instead of `cam.logit_scale` (the
        pretrain report's scale choice; 0 here is a literal 0).

    Returns:
      (cams [B, K, h, w], aux of `cam.initial_cams`).
    """
    block = clip.vision.blocks[len(clip.vision.blocks) - 1]
    scale = logit_scale
    if scale is None:
        scale = gradcam_scale(clip, config.cam.logit_scale)
    head_fns = None
    if heads is not None:
        head_fns = (lambda v: heads.isa(v, use_running_average=True),
                    lambda t: heads.tsa(t, use_running_average=True))
    cams, aux = cam_lib.initial_cams(
        block.ln_1, block.from_ln1, clip.vision.project, x11, text_fg,
        text_bg, cls_ids, grid, target=config.cam.target,
        logit_scale=scale, heads=head_fns)
    return jax.lax.stop_gradient(cams), aux


# Table 3 steps (CAM refinements) and the seed entries built on them.
TABLE3_STEPS = ("initial_cam", "clip_attn", "clip_dino", "sgc")
# Seed-score entries: the paper's Table 4 pair, Table 3 rows, final labels.
SEED_ENTRIES = ("cam_plain", "cam_cmpa") + TABLE3_STEPS + ("pseudo_labels",)


def refine_fn(cams: Array, slot_valid: Array, sgc: sgc_lib.SGCParams,
              **arrays) -> Callable[[bool, bool, str], Array]:
    """refine(use_clip_attn, use_dino_attn, mask_kind) -> [B, K, h, w]:
    `sgc.refine_cams_with` of `cams` and the knobs `sgc`
    (`params.method_params(config).sgc`) with the given arrays
    (clip_attn, dino_aff, clip_aff, image, superpixels, valid)."""
    def refine(use_clip: bool, use_dino: bool, mask_kind: str) -> Array:
        return sgc_lib.refine_cams_with(
            cams, slot_valid, sgc, use_clip_attn=use_clip,
            use_dino_attn=use_dino, mask_kind=mask_kind, **arrays)
    return refine


def table3_steps(cams: Array, refine: Callable[[bool, bool, str], Array],
                 *, has_dino: bool, base_mask: str) -> dict[str, Array]:
    """The CAMs after each step of SSR's Table 3 (`TABLE3_STEPS`).

    Args:
      cams: [B, K, h, w] initial CAMs (row 1).
      refine: from `refine_fn`.
      has_dino: an affinity encoder is loaded (without one, "clip_dino"
        equals "clip_attn" and "sgc" uses CLIP attention only).
      base_mask: the mask of rows 2-3 ("box" as CLIP-ES, or "none");
        row 4 is the superpixel mask (SGC).

    Returns:
      {step: [B, K, h, w]}.
    """
    return {
        "initial_cam": cams,
        "clip_attn": refine(True, False, base_mask),
        "clip_dino": refine(True, has_dino, base_mask),
        "sgc": refine(True, has_dino, "superpixel"),
    }


def par_labels(refined: Array, cls_ids: Array, pixels: Array, valid: Array,
               config) -> Array:
    """Pseudo labels: PAR of the refined CAMs, background, argmax (SPEC
    1.7); [B, H, W] int32, `data.ignore_index` on padding."""
    return par_lib.pseudo_labels(
        refined, cls_ids, pixels, valid,
        **params_lib.method_params(config).par.knobs(),
        ignore_index=config.data.ignore_index)


def loss_inputs(hidden: Array, grid: tuple[int, int], labels: Array,
                cams: Array, tokens: Array, cls_ids: Array) -> dict[str, Any]:
    """The part of the path `loss_fn` reads without the optional readings:
    hidden [L, B, N, D] patch tokens of the decoder's input blocks, grid,
    labels [B, H, W], cams [B, K, h, w], tokens [B, N, E] projected patch
    tokens, cls_ids [B, K] (and slot_valid derived from it)."""
    return {"hidden": hidden, "grid": grid, "labels": labels, "cams": cams,
            "tokens": tokens, "cls_ids": cls_ids, "slot_valid": cls_ids >= 0}


def affinity_encoder_affinity(dino, image: Array, grid: tuple[int, int],
                              clip_patch: int, kind: str = "dino", *,
                              all_blocks: bool = False, layers: int = 1,
                              ) -> Array | list[Array]:
    """A_DINO on CLIP's patch grid (SPEC 1.6; `models/encoders.py`).

    Args:
      dino: the frozen affinity encoder (declares its `layout`).
      image: [B, H, W, 3] uint8.
      grid: CLIP's patch grid (h, w).
      clip_patch: CLIP's patch size in pixels.
      kind: `model.dino_kind` (picks the input normalisation).
      all_blocks: return every block's affinity instead (diagnostics).
      layers: A_DINO = the mean of the last `layers` blocks' affinities
        (`sgc.dino_layers`; 1 = the last block's, the paper's reading).

    Returns:
      [B, h·w, h·w] float32 patch-to-patch affinity of the head-averaged
      attention (`layers` last blocks, averaged), prefix tokens dropped,
      resampled onto CLIP's grid when the encoder's differs
      (`encoders.patch_affinity`); with `all_blocks`, the list of every
      block's.
    """
    _, dout = dino(normalise(image, encoders.NORMALIZATION[kind]))
    if not 1 <= layers <= len(dout["attn"]):
        raise ValueError(f"sgc.dino_layers={layers}: the affinity encoder "
                         f"has {len(dout['attn'])} blocks")
    attn = dout["attn"] if all_blocks else dout["attn"][-layers:]
    affs = [encoders.patch_affinity(a, dino.layout, dout["grid"], grid,
                                    target_patch=clip_patch) for a in attn]
    return affs if all_blocks else mean_affinity(affs)


def mean_affinity(affs: Sequence[Array]) -> Array:
    """The mean of block affinities (one block: itself, unchanged)."""
    return affs[0] if len(affs) == 1 else sum(affs) / len(affs)


def pseudo_label_path(clip, dino, heads, batch: Batch, text_fg: Array,
                      text_bg: Array, config, *, all_steps: bool = False,
                      step: Array | None = None,
                      rfm_feat_fn: Callable[[Array, tuple[int, int]], Array]
                      | None = None, slots: int | None = None
                      ) -> dict[str, Any]:
    """The online pseudo-label path, all inside jit (SPEC 1.1–1.7).

    Args:
      clip: the Flax CLIP (frozen).
      dino: the frozen affinity encoder (`model.dino_kind`: DINO ViT or
        DINOv2), or None when unused.
      heads: `cmpa.CMPAHeads` (used in eval mode for the CAM), or None.
      batch: the batch of docs/DESIGN.md ("image", "valid", "labels",
        "superpixels"); "superpixels" only when `sgc.mask` is
        "superpixel" or with `all_steps` (the Table 3 "sgc" step).
      text_fg: [C, E] foreground text bank (L2-normalised).
      text_bg: [M, E] background text bank.
      config: the run config (Python constants only are read).
      all_steps: also return the CAMs after each Table 3 step (seed
        evaluation); the train step leaves it off.
      step: the training step (WeCLIP's RFM switches on at
        `loss.rfm_start`); None = after the switch (evaluation).
      rfm_feat_fn: (hidden [L, B, N, D], grid) -> decoder feature F
        [B, N, E]; needed when `loss.rfm` (WeCLIP's refinement module).
      slots: the static class-slot count K (a bucket from
        `cam.batch_slots`, >= the batch's largest class count); None =
        `data.max_classes_per_image`.

    Returns:
      dict with "labels" [B, H, W] int32 pseudo labels (255 on padding),
      "cams" [B, K, h, w] initial CAMs, "refined" [B, K, h, w],
      "cls_ids" [B, K], "slot_valid" [B, K], "hidden" [L, B, N, D] (decoder
      input), "tokens" [B, N, E] projected patch tokens, "token_valid"
      [B, N] (patches with a valid pixel, `token_valid`), "text_bg" (the
      background bank, for `cmpa.background_negatives`), "grid", and with
      `all_steps` a dict "steps" of refined CAMs per Table 3 step.
    """
    image = batch["image"]
    superpixels = batch.get("superpixels")
    if superpixels is None and (config.sgc.mask == "superpixel"
                                or all_steps):
        raise ValueError(
            "the batch has no 'superpixels' (SLIC ids), which "
            + ("sgc.mask='superpixel' needs" if config.sgc.mask ==
               "superpixel" else "all_steps=True (the 'sgc' step) needs")
            + ": add them to the batch, or use sgc.mask='box' / 'none'")
    pixels = normalise(image, config.data.normalization)
    x11, out, grid = clip_trunk(clip, pixels)
    cls_ids = cam_lib.present_classes(
        batch["labels"], slots or config.data.max_classes_per_image)
    slot_valid = cls_ids >= 0
    cams, aux = initial_cams(clip, x11, cls_ids, grid, text_fg, text_bg,
                             config, heads if config.cam.projected else None)
    clip_attn = tuple(out["attn"]) + (aux["attn12"],)
    hidden = jnp.stack(
        [_patch_tokens(hs) for hs in
         out["hidden"][:config.model.decoder.num_layers_in]])
    hidden = jax.lax.stop_gradient(hidden)
    clip_aff = None
    if config.loss.rfm:
        if rfm_feat_fn is None:
            raise ValueError("loss.rfm=True needs the decoder feature")
        feat = jax.lax.stop_gradient(rfm_feat_fn(hidden, grid))
        gated = sgc_lib.rfm_affinity(clip_attn, feat, config.loss.rfm_layers)
        plain = sgc_lib.clip_affinity(clip_attn, config.sgc.clip_layers)
        on = (True if step is None else step >= config.loss.rfm_start)
        clip_aff = jnp.where(on, gated, plain)
    dino_aff = None
    s = config.sgc
    if dino is not None and (s.use_dino_attn or all_steps):
        dino_aff = affinity_encoder_affinity(
            dino, image, grid, clip.vision.config.patch_size,
            config.model.get("dino_kind", "dino"),
            layers=s.get("dino_layers", 1))

    refine = refine_fn(cams, slot_valid, params_lib.method_params(config).sgc,
                       clip_attn=clip_attn, dino_aff=dino_aff,
                       clip_aff=clip_aff, image=image,
                       superpixels=superpixels, valid=batch["valid"])
    refined = refine(s.use_clip_attn, s.use_dino_attn and dino is not None,
                     s.mask)
    labels = par_labels(refined, cls_ids, pixels, batch["valid"], config)

    result = loss_inputs(
        hidden, grid, labels, cams,
        jax.lax.stop_gradient(_patch_tokens(aux["tokens"])), cls_ids)
    result.update({
        "refined": refined,
        "token_valid": token_valid(batch["valid"], grid),
        "text_bg": text_bg,
        "clip_x12": aux["y12"],
    })
    if all_steps:
        base = s.mask if s.mask != "superpixel" else "box"
        result["steps"] = table3_steps(cams, refine,
                                       has_dino=dino is not None,
                                       base_mask=base)
    return result


def initial_cam(clip, heads, batch: Batch, text_fg: Array, text_bg: Array,
                config, *, projected: bool, slots: int | None = None
                ) -> Array:
    """The initial GradCAM with (`projected`) or without the CMPA heads.

    The paper's Table 4 compares the two; `pseudo_label_path` computes
    only the configured one (`cam.projected`). The CLIP trunk it repeats is
    the same computation on the same inputs, which XLA merges.

    Returns:
      [B, K, h, w] CAMs in [0, 1].
    """
    pixels = normalise(batch["image"], config.data.normalization)
    x11, _, grid = clip_trunk(clip, pixels)
    cls_ids = cam_lib.present_classes(
        batch["labels"], slots or config.data.max_classes_per_image)
    cams, _ = initial_cams(clip, x11, cls_ids, grid, text_fg, text_bg,
                           config, heads if projected else None)
    return cams


def seed_labels(clip, dino, model: SSRModel, batch: Batch, text_fg: Array,
                text_bg: Array, config, *, slots: int | None = None
                ) -> dict[str, Array]:
    """Label maps of every seed entry (`SEED_ENTRIES`) for one batch.

    CAM entries become labels with `par.cams_to_labels` (background =
    (1 − max CAM)^bg_power, argmax, no PAR) at the batch's padded size;
    "pseudo_labels" is the full path (SGC + PAR, 255 on padding).
    "cam_cmpa" is left out with `cmpa.variant="none"` (no trained heads).

    Args:
      clip, dino, model: the frozen encoders (dino may be None) and the
        trained model.
      batch: a seed batch (docs/DESIGN.md "The batch", with masks).
      text_fg, text_bg: the text bank.
      config: the run config.
      slots: class slots (`pseudo_label_path`); None = kmax.

    Returns:
      {entry: int32 [B, S, S]} (0 background, class c → c + 1).
    """
    path = pseudo_label_path(clip, dino, model.heads, batch, text_fg,
                             text_bg, config, all_steps=True, slots=slots)
    cams = dict(path["steps"])
    cmpa_on = config.cmpa.variant != "none"
    if config.cam.projected and cmpa_on:
        cams["cam_cmpa"] = cams["initial_cam"]
        cams["cam_plain"] = initial_cam(clip, model.heads, batch, text_fg,
                                        text_bg, config, projected=False,
                                        slots=slots)
    else:
        cams["cam_plain"] = cams["initial_cam"]
        if cmpa_on:
            cams["cam_cmpa"] = initial_cam(clip, model.heads, batch,
                                           text_fg, text_bg, config,
                                           projected=True, slots=slots)
    out_hw = batch["image"].shape[1:3]
    labels = {k: par_lib.cams_to_labels(v, path["cls_ids"], out_hw,
                                        config.par.bg_power)[1]
              for k, v in cams.items()}
    labels["pseudo_labels"] = path["labels"]
    return labels


def token_valid(valid: Array, grid: tuple[int, int]) -> Array:
    """[B, H, W] valid pixels -> [B, h·w] patches with any valid pixel."""
    b, hh, ww = valid.shape
    h, w = grid
    v = valid.reshape(b, h, hh // h, w, ww // w)
    return v.any(axis=(2, 4)).reshape(b, h * w)


def _isa_tokens(heads, path: dict, config
                ) -> tuple[Array, Array, Array | None]:
    """(ISA of the projected patch tokens [B, N, d] with training-mode
    BatchNorm, the pooling CAMs [B, K, N], the token mask [B, N] or None):
    one ISA call, so BatchNorm's running statistics move once per step."""
    b, k = path["cls_ids"].shape
    n = path["tokens"].shape[1]
    cams = path["cams"].reshape(b, k, n)
    if params_lib.method_params(config).cmpa.valid_tokens_only:
        mask = path["token_valid"]
        v = heads.isa(path["tokens"], mask=mask)
        return v, cams * mask[:, None, :].astype(cams.dtype), mask
    return heads.isa(path["tokens"]), cams, None


def cmpa_image_features(heads, path: dict, config) -> Array:
    """f_image of every (image, class slot) (Eq. 2): ISA of the projected
    patch tokens (training-mode BatchNorm), pooled under the initial CAMs.

    [choice] `cmpa.valid_tokens_only` (False): tokens of patches without a
    valid pixel (crop padding) are left out of ISA's BatchNorm statistics
    and of the pooling. Off by default: the embedded table was measured
    with padding in both (docs/diagnostics.md, "bug candidates").

    Returns:
      [B, K, d] float32.
    """
    v, cams, _ = _isa_tokens(heads, path, config)
    return cmpa_lib.masked_average_pool(v, cams, path["slot_valid"])


def seg_logits(model: SSRModel, hidden: Array, grid, out_hw,
               dropout_key: Array | None = None) -> tuple[Array, Array]:
    """Decoder logits upsampled to `out_hw` [B, H, W, C] and its feature.

    Dropout is on exactly when `dropout_key` is given (training).
    """
    logits, feat = model.decoder(hidden, grid,
                                 deterministic=dropout_key is None,
                                 dropout_key=dropout_key)
    return resize(logits, out_hw, "bilinear"), feat


def loss_fn(model: SSRModel, path: dict, text_fg: Array, protos: dict,
            config, dropout_key: Array) -> tuple[Array, dict]:
    """L = w_p·L_proto + γ·L_seg (+ w_a·L_aff), Eq. 12.

    Args:
      model: the trainable `SSRModel` (train mode).
      path: the output of `pseudo_label_path` (no gradient flows into it).
      text_fg: [C, E] foreground text bank.
      protos: CMPA prototypes from `cmpa.recluster`.
      config: the run config.
      dropout_key: PRNG key of the decoder's channel dropout.

    Returns:
      (total loss, measurements dict with every loss part and the CMPA aux).
    """
    labels = path["labels"]
    logits, feat = seg_logits(model, path["hidden"], path["grid"],
                              labels.shape[1:3], dropout_key)
    l_seg = losses.balanced_seg_ce(logits, labels,
                                   config.data.ignore_index)
    parts = {"seg": l_seg}

    mp = params_lib.method_params(config)
    p = mp.cmpa
    heads = model.heads
    b, k = path["cls_ids"].shape
    if p.variant != "none":
        v, cams, tmask = _isa_tokens(heads, path, config)
        f_img = cmpa_lib.masked_average_pool(v, cams, path["slot_valid"])
        f_text_bg = None
        if p.background_pool:
            # One TSA call over [foreground; background] texts: one
            # BatchNorm update per step and one normalisation for both.
            n_fg = text_fg.shape[0]
            f_all = heads.tsa(jnp.concatenate(
                [text_fg, path["text_bg"].astype(text_fg.dtype)]))
            f_text, f_text_bg = f_all[:n_fg], f_all[n_fg:]
        else:
            f_text = heads.tsa(text_fg)
        extra = None
        if p.background_negatives:
            # [choice] TSA(background prompts) as extra InfoNCE negatives
            # (docs/diagnostics.md); off: the paper writes only the
            # foreground text prototypes.
            extra = (heads.tsa(path["text_bg"]) if f_text_bg is None
                     else f_text_bg)
        l_proto, aux = cmpa_lib.cmpa_loss(
            p.variant, f_img, f_text, path["slot_valid"], path["cls_ids"],
            protos, heads.tau(), p.positive, extra_negatives=extra)
        if p.background_pool:
            # [choice] `cmpa.background_pool`: the tokens pooled under
            # 1 − max CAM held at TSA(background prompts), away from the
            # classes (cmpa.background_pool_loss; docs/diagnostics.md).
            if p.variant not in ("cross", "feature"):
                raise ValueError(
                    f"cmpa.background_pool=True needs cmpa.variant 'cross' "
                    f"or 'feature', got {p.variant!r}")
            f_bg, bg_valid = cmpa_lib.background_pool(
                v, cams, path["slot_valid"], tmask)
            l_bg, bg_aux = cmpa_lib.background_pool_loss(
                f_bg, bg_valid, f_text, f_text_bg, heads.tau())
            l_proto = l_proto + p.background_pool_weight * l_bg
            aux = {**aux, "bg_loss": l_bg, **bg_aux}
        parts["proto"] = l_proto
    else:
        f_img = jnp.zeros((b, k, p.dim))
        parts["proto"] = jnp.zeros(())
        aux = {}
    if config.loss.aff_weight > 0:
        aff = jax.nn.sigmoid(jnp.einsum("bnd,bmd->bnm", feat, feat))
        parts["aff"] = losses.affinity_loss(
            aff, labels, path["grid"], config.loss.aff_radius,
            config.data.ignore_index)
    else:
        parts["aff"] = jnp.zeros(())
    total = losses.total_loss(parts, mp.loss)
    measurements = {f"loss_{k_}": v_ for k_, v_ in parts.items()}
    measurements.update({f"cmpa_{k_}": v_ for k_, v_ in aux.items()})
    measurements["f_img"] = jax.lax.stop_gradient(f_img)
    return total, measurements
