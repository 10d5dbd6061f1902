"""Dataset specs: everything ssr_jax knows about a dataset, in one place.

A `DatasetSpec` names a dataset's classes, palette, CLIP prompts, class
limits, config presets, split names, TFDS builder and reader. Every place
that used to compare `config.data.name` with a string asks the spec
instead (`get(config.data.name).synthetic`, `.tfds_builder`, ...). VOC,
COCO and the synthetic world are registered below; a new dataset in the
VOC directory layout is one more `register(DatasetSpec(...))` (here, or in
a module of `ssr_jax/data/` imported by its config file) and a config file
in `configs/` (docs/data.md "Adding a dataset").

Cheap to import (no numpy, no JAX): `config_defaults` and the config files
read the presets from here.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Mapping

from ssr_jax.data import DataError, vocabularies

READERS = ("voc_tree",)  # data.voc + data.splits: the VOC directory layout


@functools.lru_cache(maxsize=1)
def voc_palette() -> tuple[int, ...]:
    """The PASCAL VOC colour map (256 RGB triples, flattened; index 255 is
    (224, 224, 192)), for writing palette PNGs (`Image.putpalette`) that
    VOC tools display as VOC does. The one copy: `voc.palette`, the
    synthetic world and `tools/coco_masks.py` use it."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= (c & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return tuple(pal)


class UnknownDatasetError(DataError, ValueError):
    """`data.name` names no registered dataset (the message lists them)."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One dataset.

    Attributes:
      name: `config.data.name`.
      num_classes: classes including background (`data.num_classes`).
      classes: class names, background first, label id = index; None: read
        from `<data.root>/classes.json` (`voc.folder_class_names`), which
        also wins over these when present.
      fg_prompts, bg_prompts: CLIP prompts (one per foreground class; any
        number of background ones) for `text.dataset_prompts`; None: the
        `prompts` / `background_prompts` fields of `<root>/classes.json`.
      prompt_names: the names `text.dataset_prompts` returns with the
        prompts; default `classes` (COCO keeps WeCLIP's spellings).
      palette: 768 ints (256 RGB triples) for palette PNGs; default VOC's.
      max_classes_per_image: static class padding of the CAM
        (`data.max_classes_per_image`); ignore_index: the void label.
      train_split, val_split, seed_split: list files under
        `ImageSets/Segmentation/` (`data.*_split`).
      crop_size: training crop (`data.crop_size`).
      batch_size: global batch per optimiser preset (`train.batch_size`),
        e.g. `{"paper": 128, "weclip": 4}`; num_steps: `train.num_steps`.
      overrides: other config fields this dataset changes, as
        `(("sgc.theta_h", 0.7), ...)` (COCO's thresholds).
      reader: how examples are read (`READERS`): "voc_tree", the VOC
        directory layout of docs/data.md.
      tfds_builder: TFDS builder name (`python -m ssr_jax.data.build`);
        None: no TFDS build. tfds_class: "module:Class" of the builder.
      config_file: the config file for messages ("configs/voc.py").
      synthetic: the generated world of the embedded default: its root is
        generated (data.root must stay empty), training runs through
        `embedded`, and its meta allows `eval.diagnostics`.
      split_notes: {split: note logged when training on it}.
    """

    name: str
    num_classes: int
    max_classes_per_image: int
    batch_size: Mapping[str, int]
    num_steps: int
    classes: tuple[str, ...] | None = None
    fg_prompts: tuple[str, ...] | None = None
    bg_prompts: tuple[str, ...] | None = None
    prompt_names: tuple[str, ...] | None = None
    palette: tuple[int, ...] = dataclasses.field(default_factory=voc_palette)
    ignore_index: int = 255
    train_split: str = "train"
    val_split: str = "val"
    seed_split: str = "train"
    crop_size: int = 320
    overrides: tuple[tuple[str, object], ...] = ()
    reader: str = "voc_tree"
    tfds_builder: str | None = None
    tfds_class: str | None = None
    config_file: str = ""
    synthetic: bool = False
    split_notes: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"DatasetSpec {self.name!r}: {msg}")

        if not self.name or not self.name.isidentifier():
            bad("name must be a non-empty identifier")
        if self.num_classes < 2:
            bad(f"num_classes={self.num_classes}: background and at least "
                "one foreground class")
        if self.classes is not None:
            if len(self.classes) != self.num_classes:
                bad(f"{len(self.classes)} class names for num_classes="
                    f"{self.num_classes}")
            if self.classes[0] != "background":
                bad("classes must start with 'background'")
        if (self.fg_prompts is None) != (self.bg_prompts is None):
            bad("give both fg_prompts and bg_prompts, or neither")
        if self.fg_prompts is not None:
            if self.classes is None:
                bad("built-in prompts need built-in classes")
            if len(self.fg_prompts) != self.num_classes - 1:
                bad(f"{len(self.fg_prompts)} fg_prompts for "
                    f"{self.num_classes - 1} foreground classes")
            if not self.bg_prompts:
                bad("bg_prompts is empty")
        names = self.prompt_names
        if names is not None and len(names) != self.num_classes:
            bad(f"{len(names)} prompt_names for num_classes="
                f"{self.num_classes}")
        if len(self.palette) != 768:
            bad(f"palette has {len(self.palette)} ints, not 256 RGB triples")
        if not 1 <= self.max_classes_per_image < self.num_classes:
            bad(f"max_classes_per_image={self.max_classes_per_image}: must "
                f"lie in [1, {self.num_classes - 1}]")
        if set(self.batch_size) != {"paper", "weclip"}:
            bad(f"batch_size needs the presets 'paper' and 'weclip', got "
                f"{sorted(self.batch_size)}")
        if self.reader not in READERS:
            bad(f"reader={self.reader!r}: one of {READERS}")
        if (self.tfds_builder is None) != (self.tfds_class is None):
            bad("give both tfds_builder and tfds_class, or neither")
        # Frozen and hashable-looking: keep the mappings read-only.
        object.__setattr__(self, "batch_size",
                           types.MappingProxyType(dict(self.batch_size)))
        object.__setattr__(self, "split_notes",
                           types.MappingProxyType(dict(self.split_notes)))

    @property
    def needs_root(self) -> bool:
        """The user points `data.root` at the files (not generated)."""
        return not self.synthetic

    @property
    def config_hint(self) -> str:
        return self.config_file or f"a config with data.name={self.name!r}"


_REGISTRY: dict[str, DatasetSpec] = {}


def register(spec: DatasetSpec, *, replace: bool = False) -> DatasetSpec:
    """Adds `spec` under `spec.name`; a second spec of a name is refused
    unless `replace` (tests re-register their toy datasets)."""
    if not isinstance(spec, DatasetSpec):
        raise TypeError(f"register() takes a DatasetSpec, got {spec!r}")
    if spec.name in _REGISTRY and not replace and _REGISTRY[spec.name] != spec:
        raise ValueError(f"dataset {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Removes a registered dataset (tests)."""
    _REGISTRY.pop(name, None)


def names() -> tuple[str, ...]:
    """The registered dataset names, in registration order."""
    return tuple(_REGISTRY)


def get(name: str) -> DatasetSpec:
    """The spec of `name`; `UnknownDatasetError` listing the registered."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise UnknownDatasetError(
            f"unknown dataset data.name={name!r}; registered datasets: "
            f"{', '.join(names())}. A new dataset needs a DatasetSpec in "
            "ssr_jax/data/ (docs/data.md \"Adding a dataset\")") from None


# --- the built-in datasets ----------------------------------------------------

VOC = register(DatasetSpec(
    name="voc",
    num_classes=21,
    classes=vocabularies.VOC_CLASSES,
    fg_prompts=vocabularies.VOC_FG_PROMPTS,
    bg_prompts=vocabularies.VOC_BG_PROMPTS,
    prompt_names=vocabularies.VOC_CLASS_NAMES,
    max_classes_per_image=6,  # counted on VOC train_aug label files
    train_split="train_aug",
    val_split="val",
    seed_split="train",
    batch_size={"paper": 128, "weclip": 4},  # [paper] / [WeCLIP]
    num_steps=30000,  # [paper]
    tfds_builder="voc_aug",  # TFDS's own `voc` has no segmentation masks
    tfds_class="ssr_jax.data.tfds_voc:VocAug",
    config_file="configs/voc.py",
    split_notes={"train": "training on VOC 'train' (1,464 images); the "
                 "papers use 'train_aug' (10,582: VOC + SBD), "
                 "--config.data.train_split=train_aug"},
))

COCO = register(DatasetSpec(
    name="coco",
    num_classes=81,
    classes=vocabularies.COCO_CLASSES,
    fg_prompts=vocabularies.COCO_FG_PROMPTS,
    bg_prompts=vocabularies.COCO_BG_PROMPTS,
    prompt_names=vocabularies.COCO_CLASS_NAMES,
    max_classes_per_image=18,  # counted on COCO train2014
    train_split="train",
    val_split="val",
    seed_split="train",
    batch_size={"paper": 256, "weclip": 8},  # [paper] / [WeCLIP]
    num_steps=80000,  # [paper]
    overrides=(
        ("sgc.theta_h", 0.7),  # [choice] as the CLIP-ES COCO box threshold
        ("sgc.box_threshold", 0.7),  # [WeCLIP]
        ("loss.rfm_start", 40000),  # [WeCLIP]
        ("loss.rfm_layers", 10),  # [WeCLIP]
    ),
    tfds_builder="coco_seg",  # TFDS's own `coco` has no class masks
    tfds_class="ssr_jax.data.tfds_coco:CocoSeg",
    config_file="configs/coco.py",
))

# The procedurally generated world (configs/synthetic.py): names and
# prompts come from the classes.json the generator writes; the presets are
# VOC's (configs/synthetic.py sets its own batch and schedule).
SYNTHETIC = register(DatasetSpec(
    name="synthetic",
    num_classes=11,  # background + 10 (classes.json num_classes)
    max_classes_per_image=4,  # classes.json max_classes_per_image
    train_split="train",
    val_split="val",
    seed_split="train",
    crop_size=160,
    batch_size={"paper": 128, "weclip": 4},
    num_steps=30000,
    tfds_builder="synthetic_world",
    tfds_class="ssr_jax.data.tfds_synthetic:SyntheticWorld",
    config_file="configs/synthetic.py",
    synthetic=True,
))
