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


def _innermost(e: BaseException) -> BaseException:
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        nxt = e.__cause__ or e.__context__
        if nxt is None:
            break
        e = nxt
    return e


def _clean(text: str) -> str:
    text = text.replace("\\n", " ").replace("\\'", "'").replace("\n", " ")
    text = text.strip()
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]
    return text.strip()


def _parse_flags(argv: list[str]) -> list[str]:
    """Parses flags; a bad flag or config override is a short message."""
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001 - every parse error is user-facing
        inner = _innermost(e)
        msg = _clean(str(inner))
        if isinstance(inner, AttributeError | KeyError):
            msg = f"unknown config field {msg} {config_check.FIELD_HINT}"
        elif inner is not e and "Traceback" in str(e):
            msg = f"{type(inner).__name__}: {msg}"
        else:
            msg = _clean(str(e).split("Traceback")[0])
        print(f"ssr_jax: error in the command line: {msg}", file=sys.stderr)
        print("Run with --helpshort for the flags; the config fields are "
              "listed in ssr_jax/config_defaults.py.", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        config = _CONFIG.value
        if config is not None:
            config.data.name  # noqa: B018 - forces the lazy config load
    except OSError as e:
        lines = [ln.strip() for ln in str(_innermost(e)).splitlines()]
        _fail("cannot load the config file: "
              + " ".join(ln for ln in lines if ln))
    if config is None:
        _fail("--config is required, e.g. --config configs/synthetic.py")
    workdir = _WORKDIR.value or os.path.join("runs", config.data.name)
    errors = config_check.validate(config, check_devices=False)
    if errors:
        _fail("the config is invalid:\n  - " + "\n  - ".join(errors))

    # Heavy imports only after the config is known to be good; multi-host
    # initialisation before anything touches the JAX backend.
    from ssr_jax import distributed
    try:
        distributed.maybe_initialize(config)
    except distributed.ConfigError as e:
        _fail(f"multi-host settings: {e}")
    errors = config_check.device_errors(config)
    if errors:
        _fail("the config does not fit the devices:\n  - "
              + "\n  - ".join(errors))
    _xla_self_check()
    try:
        _dispatch(config, workdir)
    except config_check.ConfigError as e:
        _fail(str(e))


def _xla_self_check() -> None:
    """Refuses to run on a backend that miscompiles GradCAM's vmapped vjp."""
    from ssr_jax import xla_guard
    rep = xla_guard.report()
    logging.info("XLA self-check on %s (jax %s, jaxlib %s, guard %s): %s, "
                 "rel err %.2g in %.2f s", rep["backend"], rep["jax"],
                 rep["jaxlib"], rep["guard"],
                 "ok" if rep["self_check"]["ok"] else "FAILED",
                 rep["self_check"]["rel_err"], rep["self_check"]["seconds"])
    if not rep["self_check"]["ok"]:
        _fail(xla_guard.refusal(rep))


def _dispatch(config, workdir: str) -> None:
    os.makedirs(workdir, exist_ok=True)
    logging.get_absl_handler().use_absl_log_file("ssr_jax", workdir)
    if config.data.name == "synthetic":
        from ssr_jax import embedded
        if config.mode == "train":
            embedded.run(config, workdir)
            return
        # eval / pseudo_labels on the synthetic world: the cached world
        # and encoders, then the same code as for real data.
        embedded.prepare(config)
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
