"""Host-side post-processing of segmentation logits, and DenseCRF (SPEC §2).

NumPy only (no JAX import), so that the worker processes of a DenseCRF
pool start light. `pydensecrf` (the optional `pydensecrf2==1.1` package,
`pip install -e .[crf]`) is imported only when a CRF actually runs.

- `upsample_logits`: logits at the patch grid → the original image size
  with given interpolation matrices (the evaluator builds them with
  `ssr_jax.models.resize.resize_matrix`, PyTorch bilinear semantics).
- `softmax`: over the class axis.
- `dense_crf`: WeCLIP's `utils/dcrf.py` DenseCRF (unary = −log p, a
  Gaussian and a bilateral pairwise term, mean-field inference).
- `predict`: one image's label map; the job a worker runs.
"""

from __future__ import annotations

import dataclasses

import numpy as np

INSTALL_HINT = (
    "eval.crf=True needs the optional DenseCRF package: install it with "
    "`pip install -e .[crf]` (pydensecrf2==1.1; it builds from source and "
    "needs a C++ compiler), or set --config.eval.crf=False")


class CRFUnavailableError(ImportError):
    """pydensecrf is not installed."""


@dataclasses.dataclass(frozen=True)
class CRFParams:
    """DenseCRF parameters; defaults are WeCLIP's test_msc_flip_*.py ones."""

    iters: int = 10
    pos_xy: float = 3.0
    pos_w: float = 3.0
    bi_xy: float = 64.0
    bi_rgb: float = 5.0
    bi_w: float = 4.0

    @classmethod
    def from_config(cls, ev) -> CRFParams:
        """From `config.eval` (crf_iters, crf_pos_xy, ...)."""
        return cls(int(ev.crf_iters), float(ev.crf_pos_xy),
                   float(ev.crf_pos_w), float(ev.crf_bi_xy),
                   float(ev.crf_bi_rgb), float(ev.crf_bi_w))


def require_densecrf():
    """Imports `pydensecrf.densecrf`; `CRFUnavailableError` with the hint."""
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError as e:
        raise CRFUnavailableError(f"{INSTALL_HINT} ({e})") from None
    return dcrf


def upsample_logits(logits: np.ndarray, mh: np.ndarray,
                    mw: np.ndarray) -> np.ndarray:
    """Separable interpolation of logits.

    Args:
      logits: [h, w, C] float.
      mh: [H, h] row interpolation matrix.
      mw: [W, w] column interpolation matrix.

    Returns:
      [H, W, C] float32.
    """
    h, _, c = logits.shape
    # Columns first, on the few grid rows; then the rows as one GEMM.
    x = np.matmul(mw.astype(np.float32), logits.astype(np.float32))
    y = mh.astype(np.float32) @ x.reshape(h, -1)
    return y.reshape(mh.shape[0], mw.shape[0], c)


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax along `axis` (float32)."""
    z = logits - logits.max(axis=axis, keepdims=True)
    e = np.exp(z, dtype=np.float32)
    return e / e.sum(axis=axis, keepdims=True)


def dense_crf(image: np.ndarray, probs: np.ndarray,
              params: CRFParams = CRFParams()) -> np.ndarray:
    """Fully connected CRF refinement of class probabilities.

    Args:
      image: uint8 [H, W, 3] RGB at the probabilities' size.
      probs: [C, H, W] class probabilities (sum to 1 over C).
      params: kernel widths/weights and mean-field iterations.

    Returns:
      [C, H, W] float32 refined marginals.
    """
    dcrf = require_densecrf()
    c, h, w = probs.shape
    if image.shape != (h, w, 3) or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 [{h}, {w}, 3] to match probs "
                         f"{probs.shape}; got {image.dtype} {image.shape}")
    # Unary energy −log p as pydensecrf.utils.unary_from_softmax (clip 1e-5
    # so a zero probability is a large but finite energy).
    unary = -np.log(np.clip(probs, 1e-5, None)).reshape(c, -1)
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    d.addPairwiseGaussian(sxy=params.pos_xy, compat=params.pos_w)
    d.addPairwiseBilateral(sxy=params.bi_xy, srgb=params.bi_rgb,
                           rgbim=np.ascontiguousarray(image),
                           compat=params.bi_w)
    q = d.inference(params.iters)
    return np.asarray(q, np.float32).reshape(c, h, w)


def predict(logits: np.ndarray, mh: np.ndarray, mw: np.ndarray,
            image: np.ndarray | None = None,
            params: CRFParams | None = None) -> np.ndarray:
    """One image's prediction at its original size.

    Logits are upsampled bilinearly (matrices `mh`, `mw`), then argmax; with
    `params` (CRF on) the softmax probabilities and the uint8 `image` go
    through `dense_crf` first, as WeCLIP's `crf_proc`.

    Args:
      logits: [h, w, C] averaged multi-scale logits.
      mh, mw: [H, h], [W, w] interpolation matrices.
      image: uint8 [H, W, 3] (CRF only).
      params: `CRFParams`, or None for no CRF.

    Returns:
      uint8 [H, W] class ids.
    """
    up = upsample_logits(logits, mh, mw)
    if params is None:
        return np.argmax(up, axis=-1).astype(np.uint8)
    probs = np.moveaxis(softmax(up), -1, 0)
    return np.argmax(dense_crf(image, probs, params), axis=0).astype(
        np.uint8)
