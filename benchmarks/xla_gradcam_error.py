"""GradCAM errors at ViT-B/16 last-block shapes (issue 11, known_issues.md).

On the model of tests/test_gradcam_real_shapes.py (401 tokens, width 768,
VOC batch 2 at kmax 6: 12 cotangents): the channel weights of the vmapped
vjp of `cam.gradcam` against one vjp per class slot (relative error), and
the CAMs of `cam.initial_cams` against a per-class jax.grad loop (absolute
error). From the repository root:

    python benchmarks/xla_gradcam_error.py                       # guard on
    SSR_JAX_XLA_GUARD=0 python benchmarks/xla_gradcam_error.py   # guard off
"""

import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "tests"))

import conftest  # noqa: E402, F401 - 8 CPU devices, then the XLA guard
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import test_gradcam_real_shapes as t  # noqa: E402

from ssr_jax import cam, xla_guard  # noqa: E402


class _TmpFactory:
    def mktemp(self, name):
        return tempfile.mkdtemp(prefix=name)


def main() -> None:
    setup = t.setup.__wrapped__(_TmpFactory())
    res = t._Results(setup)
    clip = setup["clip"]
    block = clip.vision.blocks[0]
    b, k = t.CASES["voc_b2_k6"]
    labels = t._labels(b, k)
    x11 = jnp.asarray(setup["x11"][:b].numpy())
    cls_ids = cam.present_classes(jnp.asarray(labels), k)
    fn = cam.clip_logits_fn(lambda h: block.from_ln1(x11, h),
                            clip.vision.project, res.fg, res.bg, cls_ids)
    a = block.ln_1(x11)

    @jax.jit
    def vmapped(a):
        probs, vjp_fn, _ = jax.vjp(fn, a, has_aux=True)
        eye = jnp.eye(k, probs.shape[1])
        ct = jnp.broadcast_to(eye[:, None], (k,) + probs.shape)
        return jax.vmap(vjp_fn)(ct)[0][:, :, 1:].mean(2)

    @jax.jit
    def one(a, slot):
        probs, vjp_fn, _ = jax.vjp(fn, a, has_aux=True)
        ct = jnp.broadcast_to(jax.nn.one_hot(slot, probs.shape[1]),
                              probs.shape)
        return vjp_fn(ct)[0][:, 1:].mean(1)

    w = np.asarray(vmapped(a))
    w_loop = np.stack([np.asarray(one(a, j)) for j in range(k)])
    rel = np.abs(w - w_loop).max() / np.abs(w_loop).max()
    per_slot = (np.linalg.norm(w - w_loop, axis=-1)
                / np.linalg.norm(w_loop, axis=-1))
    cams = res["voc_b2_k6"]["got"]
    want = t._grad_loop(clip, x11, res.fg, res.bg, labels)
    err = np.abs(cams - want)
    print(f"guard {xla_guard._state['guard']}, jaxlib "
          f"{xla_guard.jaxlib_version()}, backend {jax.default_backend()}")
    print(f"GradCAM weights: max rel err {rel:.3g}, median per-slot "
          f"{np.median(per_slot):.3g}")
    print(f"initial CAMs vs jax.grad loop: max abs err {err.max():.3g}, "
          f"mean {err.mean():.3g}")


if __name__ == "__main__":
    main()
