r"""MS COCO 2014 (train 82,081 / val 40,137), 81 classes.

Masks are rendered once from the JSON annotations (see README "Data
preparation": `python tools/coco_masks.py`). Train with the paper's optimiser
(batch 256, AdamW lr 1e-5, wd 2e-3, 80k steps):

  python -m ssr_jax.main --config configs/coco.py:paper --workdir runs/coco \
      --config.data.root=/data/coco2014 \
      --config.model.clip_path=/weights/clip-vit-base-patch16 \
      --config.model.dino_path=/weights/dino-vits16

`configs/coco.py:weclip` uses WeCLIP's optimiser (batch 8, lr 2e-4 x10 on the
decoder, wd 0.01, warmup 50, poly). Expected result (paper, with CRF): 50.6
mIoU on val, 49.2 without CRF.

Arguments (comma separated): one preset (`paper` default, `weclip`) and
optionally `tiny` (see configs/voc.py).
"""

from ssr_jax import config_defaults


def get_config(arg: str = "paper"):
    return config_defaults.dataset_config("coco", arg)
