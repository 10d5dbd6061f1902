"""Captions (the alt-text of the train images), the vocabulary and the
`classes.json` record (names, prompts, template)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ssr_jax.data.synthetic.layout import IGNORE_INDEX
from ssr_jax.data.synthetic.spec import WorldConfig

TEXTURE_WORDS = {"solid": "", "stripes": "striped", "dots": "dotted",
                 "checker": "checkered", "grain": "wooden"}
PROMPT_TEMPLATE = "a clean origami {}."


# ---------------------------------------------------------------------------
# Captions and vocabulary
# ---------------------------------------------------------------------------


def _phrases(cfg: WorldConfig, meta: dict[str, Any],
             attributes: bool) -> list[tuple[str, str]]:
    """(class name, noun phrase) per class, largest visible first."""
    area: dict[str, int] = {}
    count: dict[str, int] = {}
    texture: dict[str, str] = {}
    for o in meta["objects"]:
        area[o["class"]] = area.get(o["class"], 0) + o["visible_px"]
        count[o["class"]] = count.get(o["class"], 0) + 1
        texture.setdefault(o["class"], o["texture"])
    out = []
    for name in sorted(area, key=lambda n: -area[n]):
        spec = cfg.classes[cfg.class_names.index(name)]
        words = []
        if attributes:
            words = [w for w in (TEXTURE_WORDS[texture[name]],
                                 spec.colour_word) if w]
        if count[name] > 1:
            words = ["two"] + words + [spec.plural or name + "s"]
        else:
            first = (words or [name])[0]
            words = ["an" if first[0] in "aeiou" else "a"] + words + [name]
        out.append((name, " ".join(words)))
    return out


def _join(phrases: Sequence[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def captions(cfg: WorldConfig, meta: dict[str, Any],
             rng: np.random.Generator) -> list[str]:
    """Alt-text style captions naming the objects and the background.

    Styles, cycled up to `captions_per_image`: a full description with
    attributes ("a photo of a striped red boat and a pink flower on the
    water."); the most visible object and the background ("a boat on the
    water." or "water with a boat."); the text bank's template with one noun
    per class ("a clean origami boat and flower on the water."), so that
    "clean" and "origami" are in the vocabulary and carry no meaning. A
    horizon adds "under the sky". With `caption_background_prob` < 1 each
    caption keeps its background phrase only with that probability
    ("a boat." instead of "a boat on the water."); with
    `caption_background_scope="home"` only where the background is the home
    of a class in the image.
    """
    bg = cfg.backgrounds[cfg.background_names.index(meta["background"])]
    where = bg.phrase + (" under the sky" if meta["horizon"] else "")
    full = [p for _, p in _phrases(cfg, meta, attributes=True)]
    plain = _phrases(cfg, meta, attributes=False)
    if not plain:
        styles = [f"a photo of {bg.name}.", f"{bg.name}."]
        return [styles[i % len(styles)]
                for i in range(cfg.captions_per_image)]
    short = (f"{plain[0][1]} {where}." if rng.random() < 0.5
             else f"{bg.name} with {plain[0][1]}.")
    nouns = _join([name for name, _ in plain])
    styles = [f"a photo of {_join(full)} {where}.", short,
              f"{PROMPT_TEMPLATE.format(nouns)[:-1]} {where}."]
    out = [styles[i % len(styles)] for i in range(cfg.captions_per_image)]
    p = cfg.caption_background_prob
    if p < 1.0 and cfg.caption_background_scope == "home":
        homes = {cfg.classes[cfg.class_names.index(name)].home
                 for name, _ in plain}
        p = p if bg.name in homes else 1.0
    if p < 1.0:  # no draw at 1: the default world's captions stay as they were
        bare = [f"a photo of {_join(full)}.", f"{plain[0][1]}.",
                f"{PROMPT_TEMPLATE.format(nouns)}"]
        out = [bare[i % len(bare)] if rng.random() >= p else c
               for i, c in enumerate(out)]
    return out


def vocabulary(cfg: WorldConfig) -> list[str]:
    """Every word captions and prompts can use (for a word-level tokenizer).
    """
    words = set(PROMPT_TEMPLATE.replace("{}.", "").split())
    words |= {"a", "an", "photo", "of", "and", "with", "two", "under",
              "sky"}
    words |= {w for w in TEXTURE_WORDS.values() if w}
    for c in cfg.classes:
        words |= {c.name, c.colour_word, c.plural or c.name + "s"}
    for b in cfg.backgrounds:
        words |= {b.name} | set(b.phrase.split())
    return sorted(words)


def classes_record(cfg: WorldConfig, image_size: int) -> dict[str, Any]:
    """The classes.json content (schema in the module docstring)."""
    return {
        "classes": ["background"] + cfg.class_names,
        "prompts": cfg.class_names,
        "background_prompts": cfg.background_names,
        "template": PROMPT_TEMPLATE,
        "num_classes": len(cfg.classes) + 1,
        "ignore_index": IGNORE_INDEX,
        "max_classes_per_image": cfg.max_objects,
        "image_size": image_size,
        "colour_words": {c.name: c.colour_word for c in cfg.classes},
        "homes": {c.name: [c.home, c.home_prob] for c in cfg.classes
                  if c.home},
        "pairs": [[p.first, p.second, p.relation, p.prob]
                  for p in cfg.pairs],
        "vocabulary": vocabulary(cfg),
    }
