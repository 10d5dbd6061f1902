"""`python -m ssr_jax.data.synthetic`: generate a world, optionally a
contact sheet and the oracle statistics."""

from __future__ import annotations

import json
from collections.abc import Sequence

from ssr_jax.data.synthetic.spec import WorldConfig
from ssr_jax.data.synthetic.stats import contact_sheet, oracle_statistics
from ssr_jax.data.synthetic.writer import generate


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: generate a world, optionally a sheet and statistics."""
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m ssr_jax.data.synthetic",
        description="Generate the synthetic WSSS world (VOC layout).")
    ap.add_argument("--root", required=True, help="output directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-train", type=int, default=1500)
    ap.add_argument("--num-val", type=int, default=300)
    ap.add_argument("--image-size", type=int, default=160)
    ap.add_argument("--num-classes", type=int, default=0,
                    help="use the first N default classes (0 = all)")
    ap.add_argument("--sheet", default="", help="write a contact sheet PNG")
    ap.add_argument("--oracles", action="store_true",
                    help="print the colour / superpixel / patch oracles")
    args = ap.parse_args(argv)
    cfg = WorldConfig()
    if args.num_classes:
        cfg = cfg.subset(args.num_classes)
    info = generate(args.root, seed=args.seed, num_train=args.num_train,
                    num_val=args.num_val, image_size=args.image_size,
                    config=cfg)
    print(json.dumps(info, indent=1))
    if args.sheet:
        contact_sheet(args.root, args.sheet)
    if args.oracles:
        print(json.dumps(oracle_statistics(args.root), indent=1))


if __name__ == "__main__":
    main()
