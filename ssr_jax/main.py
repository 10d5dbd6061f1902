r"""Entry point: `python -m ssr_jax.main --config configs/voc.py --workdir DIR`.

Flags, config validation before any heavy work, and dispatch on
`config.mode` (train | eval | pseudo_labels). Everything else is a library.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from ssr_jax import config_check

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/voc.py:paper.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, metrics and outputs."
)


class UserError(Exception):
    """A mistake the user can fix; printed without a traceback."""


def _parse_flags(argv: list[str]) -> list[str]:
    """Parses flags; a bad flag or config override is a short message."""
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001 - every parse error is user-facing
        msg = str(e).strip().strip('"').strip("'")
        if isinstance(e, AttributeError | KeyError):
            msg = f"unknown config field {msg}. {config_check.FIELD_HINT}"
        print(f"ssr_jax: error in the command line: {msg}", file=sys.stderr)
        print("Run with --helpshort for the flags; the config fields are "
              "listed in ssr_jax/config_defaults.py.", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    config = _CONFIG.value
    if config is None:
        _fail("--config is required, e.g. --config configs/synthetic.py")
    workdir = _WORKDIR.value or os.path.join("runs", config.data.name)
    errors = config_check.validate(config)
    if errors:
        _fail("the config is invalid:\n  - " + "\n  - ".join(errors))

    # Heavy imports only after the config is known to be good.
    from ssr_jax import distributed
    try:
        distributed.maybe_initialize(config)
        _dispatch(config, workdir)
    except (config_check.ConfigError, distributed.ConfigError) as e:
        _fail(str(e))


def _dispatch(config, workdir: str) -> None:
    os.makedirs(workdir, exist_ok=True)
    logging.get_absl_handler().use_absl_log_file("ssr_jax", workdir)
    if config.data.name == "synthetic":
        from ssr_jax.data import synthetic_run
        synthetic_run.run(config, workdir)
        return
    if config.mode == "train":
        from ssr_jax import train
        train.train_and_evaluate(config, workdir)
    elif config.mode == "eval":
        from ssr_jax import evaluate
        evaluate.evaluate(config, workdir)
    elif config.mode == "pseudo_labels":
        from ssr_jax import evaluate
        evaluate.export_pseudo_labels(config, workdir)


def _fail(message: str) -> None:
    print(f"ssr_jax: {message}", file=sys.stderr)
    sys.exit(2)


def run() -> None:
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
