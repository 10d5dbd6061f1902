"""The command line shared by ssr_jax's programs (`python -m ssr_jax.main`,
`python -m ssr_jax.pretrain_report`, tools/): flag parsing whose mistakes
(an unknown config field, a bad value, an unknown flag) are one short
message with a suggestion and exit status 2, never a traceback.

This module defines no flags, so any program can import it:

    app.run(main, flags_parser=cli.flags_parser("pretrain_report"))
"""

from __future__ import annotations

import difflib
import importlib.util
import sys
from collections.abc import Callable

from absl import flags

from ssr_jax import config_check

EXIT_USER = 2  # a mistake in the command, config, data or weights


def innermost(e: BaseException) -> BaseException:
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        nxt = e.__cause__ or e.__context__
        if nxt is None:
            break
        e = nxt
    return e


def chain(e: BaseException) -> list[BaseException]:
    """`e` and every exception it was raised from or during, outermost
    first."""
    out, seen = [], set()
    stack: list[BaseException | None] = [e]
    while stack:
        x = stack.pop(0)
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        out.append(x)
        stack += [x.__cause__, x.__context__]
        # concurrent / asyncio groups (Orbax's async saves)
        stack += list(getattr(x, "exceptions", ()) or ())
    return out


def clean(text: str) -> str:
    text = text.replace("\\n", " ").replace("\\'", "'").replace("\n", " ")
    text = text.strip()
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]
    return text.strip()


def config_arg(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def field_names(argv: list[str]) -> list[str]:
    """Dotted names of every field of the config named in `argv` (base
    fields when it cannot be loaded)."""
    from ssr_jax import config_defaults

    config = None
    arg = config_arg(argv)
    if arg:
        path, _, variant = arg.partition(":")
        try:
            spec = importlib.util.spec_from_file_location("_ssr_cfg", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            config = (module.get_config(variant) if variant
                      else module.get_config())
        except Exception:  # noqa: BLE001 - only for suggestions
            config = None
    if config is None:
        config = config_defaults.base_config()

    def walk(node, prefix):
        for k in node.keys():
            v = node[k]
            if hasattr(v, "keys") and not isinstance(v, dict):
                yield from walk(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}"

    return list(walk(config, ""))


def suggest_field(name: str, fields: list[str]) -> list[str]:
    """Close matches for an unknown dotted field, best first: the same
    leaf in another section (data.slic_cache -> sgc.slic_cache) or a
    spelling slip (trian.batch_size -> train.batch_size)."""
    leaf = name.rsplit(".", 1)[-1]
    cands = {f for f in fields if f.rsplit(".", 1)[-1] == leaf}
    cands.update(difflib.get_close_matches(name, fields, n=5, cutoff=0.6))
    leaves: dict[str, list[str]] = {}
    for f in fields:
        leaves.setdefault(f.rsplit(".", 1)[-1], []).append(f)
    for m in difflib.get_close_matches(leaf, list(leaves), n=2, cutoff=0.8):
        cands.update(leaves[m])
    cands.discard(name)

    def score(f):
        bonus = 0.1 if f.rsplit(".", 1)[-1] == leaf else 0.0
        return difflib.SequenceMatcher(None, name, f).ratio() + bonus

    return sorted(cands, key=score, reverse=True)[:2]


def unknown_fields(argv: list[str]) -> list[str]:
    fields = set(field_names(argv))
    msgs = []
    for a in argv:
        if not a.startswith("--config."):
            continue
        name = a[len("--config."):].split("=", 1)[0]
        if name in fields or any(f.startswith(name + ".") for f in fields):
            continue
        hint = suggest_field(name, sorted(fields))
        msgs.append(f"unknown config field {name!r}"
                    + (f" (did you mean {' or '.join(hint)}?)" if hint
                       else ""))
    return msgs


def flags_parser(prog: str = "ssr_jax",
                 help_hint: str = "Run with --helpshort for the flags and "
                 "examples; the config fields are listed in "
                 "ssr_jax/config_defaults.py.",
                 ) -> Callable[[list[str]], list[str]]:
    """An `app.run(..., flags_parser=)` that parses the absl flags and, on
    a mistake, prints "<prog>: error in the command line: <what>" and
    `help_hint` to stderr and exits with `EXIT_USER`."""

    def parse(argv: list[str]) -> list[str]:
        try:
            return flags.FLAGS(argv)
        except Exception as e:  # noqa: BLE001 - every parse error is a user's
            inner = innermost(e)
            msg = clean(str(inner))
            unknown = (unknown_fields(argv)
                       if isinstance(inner, AttributeError | KeyError)
                       else [])
            if unknown:
                msg = "; ".join(unknown) + ". " + config_check.FIELD_HINT
            elif isinstance(inner, AttributeError | KeyError):
                msg = f"unknown config field {msg} {config_check.FIELD_HINT}"
            elif inner is not e and "Traceback" in str(e):
                msg = f"{type(inner).__name__}: {msg}"
            else:
                msg = clean(str(e).split("Traceback")[0])
            print(f"{prog}: error in the command line: {msg}",
                  file=sys.stderr)
            print(help_hint, file=sys.stderr)
            sys.exit(EXIT_USER)

    return parse
