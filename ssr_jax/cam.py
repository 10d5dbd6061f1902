"""Initial CAMs by GradCAM on CLIP's last block, vectorised (SPEC 1.4).

The CLIP-ES recipe that WeCLIP inherits (reference/weclip_code.md 1.3),
written so that one jitted call serves the whole batch and every present
class:

- the logits are `logit_scale * cos(mean of the projected patch tokens,
  text)` over {the present foreground classes} ∪ {the M background prompts},
  softmax over that set only; the target is the softmax probability of a
  present class (`ClipOutputTarget` on `forward_last_layer` in the
  reference);
- block 12 runs once inside one `jax.vjp`; the backward pass runs over K
  one-hot cotangents (slot k set for every image at once, which is exact
  because images do not interact), `vmap`ped on accelerators and one slot
  at a time in a `lax.map` on CPU (`default_slot_chunk`: same FLOPs, 1/K
  of the backward's temporaries), so there is no Python loop over images
  or classes and the traced program does not grow with K;
- channel weights are the mean gradient over the patch tokens (CLS dropped,
  as the reference's `reshape_transform`), cam = ReLU(Σ_d w_d · a_d), then
  pytorch_grad_cam's `scale_cam_image` twice (once per target layer, once
  after aggregating layers), exactly: (x − min) / (1e-7 + max(x − min)).

Classes are padded to a static slot count K: at most `kmax` per dataset
(VOC 6, COCO 18, config `data.max_classes_per_image`), and per batch the
smallest of `data.class_slot_buckets` that holds the batch's largest class
count (`slot_buckets`, `batch_slots`: chosen on the host, one compilation
per bucket; K only changes how many all-zero padded slots there are);
padded slots (`cls_ids == -1`) are masked to
−inf in the softmax, so an absent class has exactly no effect, as in the
reference where its text is not in the matrix at all. Padded slots give
all-zero CAMs.

[choice] `cam.target` ("ln1_output" | "ln1_input"): "ln1_output" takes the
gradient w.r.t. the output of block 12's first LayerNorm, which is what the
reference's forward hook on `resblocks[-1].ln_1` captures (that gradient
only sees the attention branch); "ln1_input" takes it w.r.t. the block
input x11 (what SPEC 1.4 words as "the input of the last block's first
LayerNorm"; the gradient then includes the residual path). The activation
multiplied by the weights is the same tensor the gradient is taken w.r.t.

[choice] `cam.projected` (True): the image side and the texts go through
the CMPA heads ISA/TSA (both L2-normalised) before the cosine, which is how
CMPA can raise the *initial* CAM (reference/ssr_paper.md 2.5, 8.4). ISA is
applied to every projected patch token and the outputs are averaged (then
L2-normalised): the uniform-weight case of Eq. 2's MAP(CAM ⊙ ISA(v)), so ISA
and its BatchNorm running statistics see the same per-token inputs as in
the CMPA loss (ISA of the mean token would be off that distribution). The
heads must treat samples independently here (BatchNorm with running
averages): with batch statistics one image's logits would depend on the
other images and the shared cotangent would mix their gradients.

The CAMs are returned under `stop_gradient`: the paper feeds CAM_c to MAP
as a constant (Eq. 2), and an outer `jax.grad` must not differentiate
through the GradCAM backward pass.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ssr_jax.models.normalize import l2_normalize

Array = jax.Array
HIGHEST = jax.lax.Precision.HIGHEST
TARGETS = ("ln1_output", "ln1_input")
# pytorch_grad_cam.utils.image.scale_cam_image divides by (1e-7 + max).
SCALE_EPS = 1e-7

LogitsFn = Callable[[Array], tuple[Array, Any]]


def present_classes(labels: Array, kmax: int) -> Array:
    """Pads each image's present classes to a static `kmax` slots.

    Args:
      labels: [B, C] multi-hot foreground labels (> 0.5 means present).
      kmax: static number of slots (`data.max_classes_per_image`).

    Returns:
      cls_ids: [B, kmax] int32, present class indices in ascending order
      (the reference's `np.unique` order), −1 in padded slots. If an image
      has more than `kmax` classes the first `kmax` are kept (call
      `check_max_classes` on the host to warn about it). Jittable.
    """
    if kmax < 1:
        raise ValueError(f"kmax={kmax}: need at least one class slot")
    num_classes = labels.shape[-1]
    idx = jnp.arange(num_classes, dtype=jnp.int32)
    keys = jnp.where(labels > 0.5, idx, num_classes)
    keys = jnp.sort(keys, axis=-1)[:, :kmax]
    if keys.shape[-1] < kmax:
        keys = jnp.pad(keys, ((0, 0), (0, kmax - keys.shape[-1])),
                       constant_values=num_classes)
    return jnp.where(keys < num_classes, keys, -1).astype(jnp.int32)


def check_max_classes(labels: np.ndarray, kmax: int) -> int:
    """Host-side: warns when images have more than `kmax` classes.

    Args:
      labels: [B, C] multi-hot labels (numpy).
      kmax: the static slot count given to `present_classes`.

    Returns:
      The number of images whose classes beyond the first `kmax` are dropped.
    """
    counts = (np.asarray(labels) > 0.5).sum(-1)
    over = int((counts > kmax).sum())
    if over:
        warnings.warn(
            f"{over} image(s) have more than {kmax} classes (up to "
            f"{int(counts.max())}); only the first {kmax} get CAMs. Raise "
            "data.max_classes_per_image to keep them all.", stacklevel=2)
    return over


def slot_buckets(buckets, kmax: int) -> tuple[int, ...]:
    """The class-slot counts the steps are compiled for (issue 15).

    Args:
      buckets: `data.class_slot_buckets`, e.g. (1, 2, 3, 6); () = always
        `kmax` (one compilation, the padded path).
      kmax: `data.max_classes_per_image`, the largest count and always a
        bucket (entries above it are dropped, so one field serves VOC's 6
        and COCO's 18).

    Returns:
      Sorted unique slot counts, the last one `kmax`.
    """
    if kmax < 1:
        raise ValueError(f"kmax={kmax}: need at least one class slot")
    bad = [b for b in buckets if int(b) != b or b < 1]
    if bad:
        raise ValueError(f"data.class_slot_buckets={tuple(buckets)}: every "
                         f"entry must be a positive integer, got {bad}")
    return tuple(sorted({int(b) for b in buckets if b < kmax} | {kmax}))


def choose_slots(count: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket holding `count` classes (the largest bucket,
    kmax, when none does: the extra classes are dropped as before, see
    `check_max_classes`). `buckets` from `slot_buckets`."""
    for b in buckets:
        if b >= count:
            return b
    return buckets[-1]


def max_class_count(labels: np.ndarray) -> int:
    """Host-side: the most classes any image of `labels` [B, C] has."""
    counts = (np.asarray(labels) > 0.5).sum(-1)
    return int(counts.max(initial=0))


def batch_slots(labels: np.ndarray, buckets: tuple[int, ...]) -> int:
    """Host-side bucket choice for a batch whose rows are split over
    processes: `labels` are this process's rows; with several processes
    the largest count is gathered from all of them (every process must
    call this, in the same order), so all compile and run the same program.

    The gather is one small collective per batch, and it waits for the
    device work queued before it (the previous step). Single-process runs
    (and every test) skip it.
    """
    count = max_class_count(labels)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415
        count = int(np.max(multihost_utils.process_allgather(
            np.asarray(count, np.int32))))
    return choose_slots(count, buckets)


def scale_cam(cam: Array) -> Array:
    """pytorch_grad_cam `scale_cam_image` over the last two axes.

    (x − min) / (1e-7 + max(x − min)) per map; an all-constant map gives 0.

    Args:
      cam: [..., gh, gw].

    Returns:
      [..., gh, gw] in [0, 1).
    """
    lo = cam.min(axis=(-2, -1), keepdims=True)
    shifted = cam - lo
    return shifted / (SCALE_EPS + shifted.max(axis=(-2, -1), keepdims=True))


def weighted_cam(weights: Array, acts: Array, slot_valid: Array,
                 grid: tuple[int, int]) -> Array:
    """GradCAM map from channel weights (SPEC 1.4).

    cam = ReLU(Σ_d w_d · a_d), then `scale_cam` twice (pytorch_grad_cam
    scales per target layer and again after aggregating the layers), 0 in
    padded slots.

    Args:
      weights: [B, K, D] channel weights (mean gradient over patch tokens).
      acts: [B, N, D] activations of the patch tokens, N = gh·gw.
      slot_valid: [B, K] bool.
      grid: (gh, gw).

    Returns:
      cams: [B, K, gh, gw], float32 or wider.
    """
    gh, gw = grid
    b, n, _ = acts.shape
    if n != gh * gw:
        raise ValueError(f"acts has {n} patch tokens but grid {grid} needs "
                         f"{gh * gw}")
    ft = _float(weights, acts)
    cam = jnp.einsum("bkd,bnd->bkn", weights.astype(ft), acts.astype(ft),
                     precision=HIGHEST)
    cam = jax.nn.relu(cam).reshape(b, -1, gh, gw)
    cam = scale_cam(scale_cam(cam))
    return jnp.where(slot_valid[:, :, None, None], cam, 0.0)


def default_slot_chunk(k: int) -> int:
    """How many class slots GradCAM's backward runs at once by default.

    CPU: one at a time (`lax.map`): the same FLOPs, which bound the time on
    a CPU, with the backward's temporaries (attention-sized, per image) held
    for one slot instead of K (issue 15: peak memory). Accelerators: all K
    in one `vmap`, where the parallelism is worth the memory.
    """
    return 1 if jax.default_backend() == "cpu" else k


def gradcam(logits_fn: LogitsFn, h: Array, slot_valid: Array,
            grid: tuple[int, int], *, slot_chunk: int | None = None
            ) -> tuple[Array, Any]:
    """Vectorised GradCAM w.r.t. `h` for K slots of every image (SPEC 1.4).

    One `jax.vjp` of `logits_fn` at `h`; its backward pass runs for the K
    one-hot cotangents (cotangent k selects slot k of every image; exact
    because images are independent in `logits_fn`), `slot_chunk` at a time:
    `vmap` over a chunk, `lax.map` over chunks (neither unrolls over K).

    Args:
      logits_fn: h -> (probs [B, K + M], aux); the first K columns are the
        class slots. Must treat images independently.
      h: [B, T, D] activations (token 0 = CLS, dropped from weights and
        cams), T = 1 + gh·gw.
      slot_valid: [B, K] bool.
      grid: (gh, gw) patch grid.
      slot_chunk: slots per backward pass; None = `default_slot_chunk`
        (1 on CPU, K elsewhere). The results agree to rounding.

    Returns:
      (cams [B, K, gh, gw] in [0, 1] (float32, or h's dtype if wider), 0
      in padded slots, under stop_gradient; aux of `logits_fn` at h, the
      forward of the same vjp).
    """
    gh, gw = grid
    if h.ndim != 3 or h.shape[1] != 1 + gh * gw:
        raise ValueError(f"h has shape {h.shape}; expected [B, 1 + {gh}*{gw}"
                         f", D] for grid {grid}")
    k = slot_valid.shape[1]
    probs, vjp_fn, aux = jax.vjp(logits_fn, h, has_aux=True)
    if probs.shape[:1] != h.shape[:1] or probs.shape[1] < k:
        raise ValueError(f"logits_fn returned probs {probs.shape}; expected "
                         f"[{h.shape[0]}, >= {k}]")
    eye = jnp.eye(k, probs.shape[1], dtype=probs.dtype)  # [K, K + M]
    cotangents = jnp.broadcast_to(eye[:, None, :], (k,) + probs.shape)

    def channel_weights(ct):  # [B, K + M] -> [B, D]
        (g,) = vjp_fn(ct)  # [B, T, D]
        return g[:, 1:, :].astype(_float(g)).mean(axis=1)

    chunk = default_slot_chunk(k) if slot_chunk is None else slot_chunk
    if chunk < 1:
        raise ValueError(f"slot_chunk={chunk}: need >= 1")
    if chunk >= k:
        weights = jax.vmap(channel_weights)(cotangents)  # [K, B, D]
    else:  # a loop over chunks of slots (lax.map: a scan, not unrolled)
        weights = jax.lax.map(channel_weights, cotangents,
                              batch_size=chunk if chunk > 1 else None)
    cams = weighted_cam(jnp.swapaxes(weights, 0, 1), h[:, 1:, :],
                        slot_valid, grid)
    return jax.lax.stop_gradient(cams), aux


def clip_logits_fn(run_block: Callable[[Array], tuple[Array, Array]],
                   project_fn: Callable[[Array], Array], text_fg: Array,
                   text_bg: Array, cls_ids: Array, *,
                   logit_scale: float = 100.0,
                   heads: tuple[Callable[[Array], Array],
                                Callable[[Array], Array]] | None = None
                   ) -> LogitsFn:
    """CLIP-ES `forward_last_layer` as a function of the GradCAM target.

    logits = logit_scale · cos(mean of the projected patch tokens, text) over
    {the K slots' foreground texts} ∪ {M background texts}; padded slots are
    −inf, so the softmax runs over the present classes and background only.
    With `heads = (isa_fn, tsa_fn)` (`cam.projected`) the image side is the
    mean of ISA over the projected patch tokens and every text goes through
    TSA before the cosine.

    Args:
      run_block: a -> (y [B, T, D], attn [B, T, T]), block 12 as a function
        of the GradCAM target a.
      project_fn: y [B, T, D] -> tokens [B, T, E] (ln_post + projection).
      text_fg: [C, E] foreground text embeddings.
      text_bg: [M, E] background text embeddings, M >= 1.
      cls_ids: [B, K] int32 slot classes, −1 = padded.
      logit_scale: `cam.logit_scale`.
      heads: optional (isa_fn [B, N, E] -> [B, N, d], tsa_fn [S, E] ->
        [S, d]), both per-sample (BatchNorm with running averages).

    Returns:
      logits_fn: a -> (probs [B, K + M], {"y12": [B, T, D], "attn12":
      [B, T, T], "tokens": [B, T, E]}).
    """
    if text_bg.shape[0] < 1:
        raise ValueError("text_bg is empty: the GradCAM softmax needs at "
                         "least one background prompt")
    num_fg = text_fg.shape[0]
    valid = cls_ids >= 0
    texts = jnp.concatenate([text_fg, text_bg], axis=0)
    if heads is not None:
        isa_fn, tsa_fn = heads
        texts = tsa_fn(texts)
    texts = l2_normalize(texts.astype(_float(texts)))
    fg = texts[jnp.where(valid, cls_ids, 0)]  # [B, K, E']
    bg = texts[num_fg:]  # [M, E']

    def logits_fn(a: Array) -> tuple[Array, Any]:
        y, attn = run_block(a)
        tokens = project_fn(y)
        patches = tokens[:, 1:, :]
        if heads is not None:
            patches = isa_fn(patches)
        image = patches.astype(_float(patches)).mean(axis=1)
        image = l2_normalize(image)
        fg_logits = jnp.einsum("be,bke->bk", image, fg, precision=HIGHEST)
        bg_logits = jnp.einsum("be,me->bm", image, bg, precision=HIGHEST)
        fg_logits = jnp.where(valid, fg_logits, -jnp.inf)
        logits = logit_scale * jnp.concatenate([fg_logits, bg_logits], -1)
        aux = {"y12": y, "attn12": attn, "tokens": tokens}
        return jax.nn.softmax(logits, axis=-1), aux

    return logits_fn


def initial_cams(ln1_fn: Callable[[Array], Array],
                 block_fn: Callable[[Array, Array], tuple[Array, Array]],
                 project_fn: Callable[[Array], Array], x11: Array,
                 text_fg: Array, text_bg: Array, cls_ids: Array,
                 grid: tuple[int, int], *, target: str = "ln1_output",
                 logit_scale: float = 100.0,
                 heads: tuple[Callable[[Array], Array],
                              Callable[[Array], Array]] | None = None,
                 slot_chunk: int | None = None
                 ) -> tuple[Array, dict[str, Array]]:
    """Initial CAMs of every present class of every image (SPEC 1.4).

    Block 12 runs once (the forward of the GradCAM vjp); its outputs come
    back in `aux` for SGC (attention) and CMPA (projected tokens).

    Args:
      ln1_fn: x [B, T, D] -> h [B, T, D], block 12's first LayerNorm.
      block_fn: (x, h) -> (y [B, T, D], attn [B, T, T]), block 12 with h in
        place of ln_1(x) (the residual still adds x).
      project_fn: y [B, T, D] -> tokens [B, T, E], ln_post + projection.
      x11: [B, T, D] output of block 11 (input of block 12).
      text_fg: [C, E] foreground text embeddings.
      text_bg: [M, E] background text embeddings.
      cls_ids: [B, K] int32 from `present_classes`.
      grid: (gh, gw), T = 1 + gh·gw.
      target: `cam.target`, "ln1_output" (reference hook) | "ln1_input".
      logit_scale: `cam.logit_scale`.
      heads: (isa_fn, tsa_fn) when `cam.projected`, else None.
      slot_chunk: `gradcam`'s (None = 1 slot at a time on CPU, all K
        elsewhere).

    Returns:
      (cams [B, K, gh, gw] in [0, 1] (float32 or wider), 0 in padded slots;
       aux {"y12": [B, T, D], "attn12": [B, T, T], "tokens": [B, T, E]}).
    """
    if target == "ln1_output":
        a = ln1_fn(x11)

        def run_block(h):
            return block_fn(x11, h)
    elif target == "ln1_input":
        a = x11

        def run_block(x):
            return block_fn(x, ln1_fn(x))
    else:
        raise ValueError(f"cam.target={target!r}: choose one of {TARGETS}")
    logits_fn = clip_logits_fn(run_block, project_fn, text_fg, text_bg,
                               cls_ids, logit_scale=logit_scale, heads=heads)
    return gradcam(logits_fn, a, cls_ids >= 0, grid, slot_chunk=slot_chunk)


def _float(*xs: Array) -> jnp.dtype:
    """At least float32 (bfloat16 activations are reduced in float32)."""
    return jnp.result_type(jnp.float32, *xs)


