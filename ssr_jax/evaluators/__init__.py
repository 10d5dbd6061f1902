"""Evaluators (big_vision's naming), each a module with one entry point:

- `segmentation.evaluate_segmentation`: the decoder on a split,
  multi-scale + flip (+ DenseCRF), data-parallel over the "data" mesh.
- `seeds.score_seeds`: CAM seeds after each Table 3 step, the Table 4 pair
  and the final pseudo labels (`ssr.seed_labels`) against the masks.
- `common`: batch sizes, placement, this process's rows, image accounting.

`ssr_jax.evaluate` holds the modes (eval, pseudo_labels) and the
in-training hook built on these.
"""
