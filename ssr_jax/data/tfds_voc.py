"""TFDS builder `voc_aug`: PASCAL VOC 2012 + SBD (SegmentationClassAug).

Splits: `train_aug` (10,582), `val` (1,449) and the seed split `train`
(1,464), as listed under `ImageSets/Segmentation/` of `data.root`
(docs/data.md). Image-level labels come from the masks (XML where an id
has none). Build: `python -m ssr_jax.data.build --config configs/voc.py
--config.data.root=<VOC2012> --config.data.tfds_dir=<dir>`.
"""

from ssr_jax.data import specs
from ssr_jax.data.tfds_builder import LayoutBuilder


class VocAug(LayoutBuilder, skip_registration=True):
    name = specs.VOC.tfds_builder
    DESCRIPTION = (
        "PASCAL VOC 2012 with the SBD augmented masks (SegmentationClassAug):"
        " JPEG images as stored, class masks (21 classes, 255 ignore), "
        "image-level labels from the masks and SLIC superpixels computed at "
        "build time by ssr_jax.")
    HOMEPAGE = "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/"
    CITATION = """@misc{pascal-voc-2012,
  author = {Everingham, M. and Van~Gool, L. and Williams, C. K. I. and
            Winn, J. and Zisserman, A.},
  title = {The {PASCAL} {V}isual {O}bject {C}lasses {C}hallenge 2012
           ({VOC2012}) {R}esults},
  year = {2012}}
@inproceedings{hariharan2011sbd,
  author = {Hariharan, B. and Arbel\\'aez, P. and Bourdev, L. and Maji, S.
            and Malik, J.},
  title = {Semantic contours from inverse detectors},
  booktitle = {ICCV}, year = {2011}}"""
