"""The procedurally generated WSSS world of the embedded default (SPEC §5).

Images of 1-4 objects of a few foreground classes (distinct silhouettes,
colour families and textures) on textured background kinds, written in the
PASCAL VOC layout so that the real loaders read them:

    <root>/JPEGImages/<id>.jpg               RGB, JPEG quality 95, 4:4:4
    <root>/SegmentationClass/<id>.png        palette PNG, 0..C, 255 = void
    <root>/SegmentationClassAug -> SegmentationClass   (relative symlink)
    <root>/ImageSets/Segmentation/{train,train_aug,val}.txt
    <root>/classes.json                      names, prompts, vocabulary
    <root>/captions.json                     train ids only (alt-text)
    <root>/meta.json                         per-image scene record
    <root>/world.json                        parameters, version, digest

The world carries the difficulties SSR is meant to fix (SPEC §1, the
paper's "over-activation in background areas and in non-target foreground
regions"):

1. background co-occurrence: a class sits on its "home" background kind
   with a configured probability (boat on water 0.9, train on rails 0.9,
   ...), so the image-level label predicts the background;
2. touching pairs: chair beside table, person riding a bike, drawn
   touching and partly occluding each other;
3. parts of objects share colours with some backgrounds (white sail and
   plane vs clouds and foam, black tyres vs asphalt, skin vs sand, green
   stem vs grass), while object outlines are colour edges (antialiased
   signed-distance shapes), so superpixels align with the masks.

Everything is a pure function of (seed, split, index): one NumPy generator
per image, no global state, so worlds are byte-identical across runs on
the same library versions and can be generated in any order.
`docs/synthetic_world.md` describes the world and its measured statistics.

Modules (this file only re-exports their public names, so callers keep
writing `synthetic.generate`, `synthetic.WorldConfig`, ...):

- `layout`: the VOC layout's splits, ids, palette and split lists;
- `spec`: the configuration (classes, backgrounds, pairs, `WorldConfig`);
- `shapes`: object silhouettes as signed distances;
- `backgrounds`: colour and noise helpers, the background kinds;
- `render`: poses, scene sampling, painting, masks (`render_scene`);
- `captions`: captions, vocabulary and the classes.json record;
- `stats`: measured rates, oracle mIoUs, the contact sheet;
- `writer`: `generate`, the idempotent, atomic writer;
- `__main__`: `python -m ssr_jax.data.synthetic`.
"""

from __future__ import annotations

from ssr_jax.data.synthetic.backgrounds import (
    BACKGROUNDS,
    BgInfo,
)
from ssr_jax.data.synthetic.captions import (
    PROMPT_TEMPLATE,
    TEXTURE_WORDS,
    captions,
    classes_record,
    vocabulary,
)
from ssr_jax.data.synthetic.layout import (
    IGNORE_INDEX,
    SPLITS,
    image_id,
    read_split,
    voc_palette,
)
from ssr_jax.data.synthetic.render import (
    Scene,
    masks_touch,
    render_scene,
)
from ssr_jax.data.synthetic.shapes import (
    PART_HSV,
    SHAPES,
    Grid,
    Parts,
)
from ssr_jax.data.synthetic.spec import (
    DEFAULT_BACKGROUNDS,
    DEFAULT_CLASSES,
    DEFAULT_PAIRS,
    PATCH_SIZE,
    TEXTURES,
    BackgroundSpec,
    ClassSpec,
    PairSpec,
    WorldConfig,
    caption_problems,
)
from ssr_jax.data.synthetic.stats import (
    contact_sheet,
    meta_statistics,
    oracle_statistics,
)
from ssr_jax.data.synthetic.writer import (
    WORLD_VERSION,
    generate,
)

__all__ = [
    "BACKGROUNDS",
    "BackgroundSpec",
    "BgInfo",
    "ClassSpec",
    "DEFAULT_BACKGROUNDS",
    "DEFAULT_CLASSES",
    "DEFAULT_PAIRS",
    "Grid",
    "IGNORE_INDEX",
    "PART_HSV",
    "PATCH_SIZE",
    "PROMPT_TEMPLATE",
    "PairSpec",
    "Parts",
    "SHAPES",
    "SPLITS",
    "Scene",
    "TEXTURES",
    "TEXTURE_WORDS",
    "WORLD_VERSION",
    "WorldConfig",
    "caption_problems",
    "captions",
    "classes_record",
    "contact_sheet",
    "generate",
    "image_id",
    "masks_touch",
    "meta_statistics",
    "oracle_statistics",
    "read_split",
    "render_scene",
    "voc_palette",
    "vocabulary",
]
