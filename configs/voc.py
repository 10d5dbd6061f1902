r"""PASCAL VOC 2012 + SBD (train_aug 10,582 / val 1,449), 21 classes.

Train with the paper's optimiser (batch 128, AdamW lr 1e-5, wd 2e-3, 30k
steps) on the local dataset and Hugging Face snapshot directories:

  python -m ssr_jax.main --config configs/voc.py:paper --workdir runs/voc \
      --config.data.root=/data/VOCdevkit/VOC2012 \
      --config.model.clip_path=/weights/clip-vit-base-patch16 \
      --config.model.dino_path=/weights/dino-vits16

`configs/voc.py:weclip` uses WeCLIP's optimiser instead (batch 4, lr 2e-4
with x10 on the decoder, wd 0.01, warmup 50, poly decay). Expected result
(paper, with CRF): 79.5 mIoU on val; 78.2 without CRF; CAM seeds on train
78.7. Eval-only: add `--config.mode=eval --config.eval.checkpoint=<dir>`.

Arguments (comma separated): one preset (`paper` default, `weclip`) and
optionally `tiny`, which shrinks everything for tests and laptops (crop 64,
batch 2, 2 steps, tiny bank); pair it with tiny model directories.
"""

from ssr_jax import config_defaults


def get_config(arg: str = "paper"):
    return config_defaults.dataset_config("voc", arg)
