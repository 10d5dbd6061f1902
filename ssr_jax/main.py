r"""Entry point: `python -m ssr_jax.main --config configs/voc.py --workdir DIR`.

Flags, config validation before any heavy work, and dispatch on
`config.mode` (train | eval | pseudo_labels). Everything else is a library.

Examples:

  # The embedded default: nothing to download (world, tiny encoders, SSR)
  python -m ssr_jax.main --config configs/synthetic.py --workdir runs/synth
  # ... shrunk: configs/synthetic.py:smoke (minutes), :tiny (seconds)
  # Eval / pseudo labels of the trained checkpoint in a workdir
  python -m ssr_jax.main --config configs/synthetic.py --workdir runs/synth \
      --config.mode=eval            # or --config.mode=pseudo_labels
  # PASCAL VOC (data layout: docs/data.md)
  python -m ssr_jax.main --config configs/voc.py:paper --workdir runs/voc \
      --config.data.root=/data/VOCdevkit/VOC2012 \
      --config.model.clip_path=/weights/clip-vit-base-patch16 \
      --config.model.dino_path=/weights/dino-vits16

Paths (the workdir and every path field of the config) are made absolute
here, once, against the current directory. Errors are one short message
on stderr with what to do; the exit codes and messages are listed in
docs/errors.md (0 done, 1 a fault, 2 a user error, 75 preempted: re-run
the same command to resume, 130 interrupted twice).
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import importlib.util
import os
import re
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

from ssr_jax import config_check
from ssr_jax.data import specs

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/synthetic.py (the embedded "
    "default), configs/synthetic.py:tiny, configs/voc.py:paper.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, metrics and outputs "
    "(default runs/<data.name>); relative paths are taken from the current "
    "directory.")
_VERBOSE = flags.DEFINE_bool(
    "verbose", False, "On an error, also print the full traceback (it is "
    "always written to <workdir>/logs/).")

EXIT_FAULT = 1  # the run failed (disk full, divergence, a bug)
EXIT_USER = 2  # a mistake in the command, config, data or weights
EXIT_PREEMPTED = 75  # saved on SIGTERM/SIGINT; re-run to resume (EX_TEMPFAIL)
EXIT_INTERRUPTED = 130  # a second Ctrl-C: stopped at once

# Config fields holding local paths, made absolute by `resolve_paths`.
PATH_FIELDS = ("data.root", "data.cache_dir", "data.tfds_dir",
               "model.clip_path",
               "model.dino_path", "train.checkpoint_dir", "synthetic.root",
               "pretrain.cache_dir")


class UserError(Exception):
    """A mistake the user can fix; printed without a traceback."""


class WorkdirBusyError(UserError):
    """Another run holds the workdir lock."""


def _innermost(e: BaseException) -> BaseException:
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        nxt = e.__cause__ or e.__context__
        if nxt is None:
            break
        e = nxt
    return e


def _chain(e: BaseException) -> list[BaseException]:
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


def _clean(text: str) -> str:
    text = text.replace("\\n", " ").replace("\\'", "'").replace("\n", " ")
    text = text.strip()
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]
    return text.strip()


# --- the command line ---------------------------------------------------------
def _config_arg(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _field_names(argv: list[str]) -> list[str]:
    """Dotted names of every field of the config named in `argv` (base
    fields when it cannot be loaded)."""
    from ssr_jax import config_defaults

    config = None
    arg = _config_arg(argv)
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


def _unknown_fields(argv: list[str]) -> list[str]:
    fields = set(_field_names(argv))
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


def _parse_flags(argv: list[str]) -> list[str]:
    """Parses flags; a bad flag or config override is a short message."""
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001 - every parse error is user-facing
        inner = _innermost(e)
        msg = _clean(str(inner))
        unknown = (_unknown_fields(argv)
                   if isinstance(inner, AttributeError | KeyError) else [])
        if unknown:
            msg = "; ".join(unknown) + ". " + config_check.FIELD_HINT
        elif isinstance(inner, AttributeError | KeyError):
            msg = f"unknown config field {msg} {config_check.FIELD_HINT}"
        elif inner is not e and "Traceback" in str(e):
            msg = f"{type(inner).__name__}: {msg}"
        else:
            msg = _clean(str(e).split("Traceback")[0])
        print(f"ssr_jax: error in the command line: {msg}", file=sys.stderr)
        print("Run with --helpshort for the flags and examples; the config "
              "fields are listed in ssr_jax/config_defaults.py.",
              file=sys.stderr)
        sys.exit(EXIT_USER)


# --- paths --------------------------------------------------------------------
def _absolute(path: str) -> str:
    if not path or "://" in path:
        return path  # "" = default; gs:// and other URLs stay as given
    return os.path.abspath(os.path.expanduser(path))


def resolve_paths(config, workdir: str | None) -> str:
    """Makes every path field of `config` and the workdir absolute (against
    the current directory, once, here), so nothing downstream depends on
    the process's working directory. Returns the absolute workdir
    (default `runs/<data.name>`)."""
    for dotted in PATH_FIELDS:
        section, name = dotted.split(".")
        if section in config and name in config[section]:
            value = config[section][name]
            if isinstance(value, str):
                config[section][name] = _absolute(value)
    spec = str(config.eval.checkpoint).strip()
    if spec and not spec.isdigit():
        config.eval.checkpoint = _absolute(spec)
    return _absolute(workdir or os.path.join("runs", config.data.name))


# --- errors -------------------------------------------------------------------
# TensorStore (Orbax's array writer) reports file-system errors as
# ValueError text, not OSError: 'RESOURCE_EXHAUSTED: Error writing local
# file "<path>": Failed writing ...' on a full disk (measured on a 64 kB
# tmpfs).
_TEXT_ERRNO = (
    ("No space left on device", errno.ENOSPC),
    ("RESOURCE_EXHAUSTED: Error writing", errno.ENOSPC),
    ("Disk quota exceeded", errno.EDQUOT),
    ("Read-only file system", errno.EROFS),
    ("Permission denied", errno.EACCES),
)


def _os_error(e: BaseException) -> OSError | None:
    for x in _chain(e):
        if isinstance(x, OSError) and x.errno in (
                errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES,
                errno.EPERM):
            return x
    for x in _chain(e):
        if isinstance(x, OSError):
            continue
        text = str(x)
        for needle, code in _TEXT_ERRNO:
            if needle in text:
                m = re.search(r'(?:file|path|directory) "([^"]+)"', text)
                return OSError(code, os.strerror(code),
                               m.group(1) if m else None)
    return None


def describe_error(e: BaseException, workdir: str | None = None
                   ) -> tuple[int, str] | None:
    """(exit code, short message with the fix) for an error the user can
    act on; None for anything else (a bug: traceback). docs/errors.md
    lists every row."""
    from ssr_jax import checkpointing, distributed
    from ssr_jax.data import DataError
    from ssr_jax.models.loading import WeightsError

    where = f" (workdir {workdir})" if workdir else ""
    os_err = _os_error(e)
    if os_err is not None:
        target = os_err.filename or workdir or "the workdir"
        if os_err.errno in (errno.ENOSPC, errno.EDQUOT):
            return EXIT_FAULT, (
                f"disk full while writing {target}: free some space (or "
                "lower train.keep_checkpoints) and re-run the same command; "
                "it resumes from the last complete checkpoint")
        return EXIT_USER, (
            f"cannot write {target}: {os.strerror(os_err.errno)}. Use a "
            "writable --workdir (and data.cache_dir / "
            "train.checkpoint_dir if set)")
    for x in _chain(e):
        if isinstance(x, checkpointing.PreemptedError):
            return EXIT_PREEMPTED, str(x)
        if isinstance(x, WorkdirBusyError | UserError):
            return EXIT_USER, str(x)
        if isinstance(x, checkpointing.CheckpointMismatchError):
            return EXIT_USER, f"checkpoint does not fit the config: {x}"
        if isinstance(x, checkpointing.CheckpointError):
            return EXIT_USER, f"checkpoint problem{where}: {x}"
        if isinstance(x, config_check.ConfigError | distributed.ConfigError):
            return EXIT_USER, str(x)
        if isinstance(x, DataError):
            return EXIT_USER, (f"data problem: {x}\n(dataset layout and "
                               "preparation: docs/data.md)")
        if isinstance(x, WeightsError):
            return EXIT_USER, f"cannot load the weights: {x}"
        if isinstance(x, FloatingPointError):
            return EXIT_FAULT, f"training diverged: {x}"
    return None


def _log_path(workdir: str | None) -> str | None:
    if not workdir:
        return None
    return os.path.join(workdir, "logs", "ssr_jax.0.log")


def _write_traceback(workdir: str | None, e: BaseException) -> str | None:
    path = _log_path(workdir)
    if path is None:
        return None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write("".join(traceback.format_exception(e)))
        return path
    except OSError:
        return None


def _exit(code: int) -> None:
    """Exits now: stdout/stderr flushed, no interpreter teardown (Orbax's
    and asyncio's shutdown hooks otherwise print pages of secondary errors
    after a failed save)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    with contextlib.suppress(Exception):
        logging.flush()
    os._exit(code)


def _quiet_closed_event_loops() -> None:
    """After a failed checkpoint write (disk full, read-only), TensorStore's
    pending callbacks call `call_soon_threadsafe` on Orbax's already closed
    asyncio loop from C++ threads, and each prints a "RuntimeError: Event
    loop is closed" traceback (measured: 100-190 of them, 600-1,100 lines
    on the terminal) before the real error reaches `handle_error`. In this
    process a callback for a closed loop is dropped instead (the call
    would only raise); open loops behave as before."""
    import asyncio

    base = asyncio.BaseEventLoop
    if getattr(base.call_soon_threadsafe, "_ssr_jax_quiet", False):
        return
    original = base.call_soon_threadsafe

    def call_soon_threadsafe(self, callback, *args, **kwargs):
        if self.is_closed():
            return None
        return original(self, callback, *args, **kwargs)

    call_soon_threadsafe._ssr_jax_quiet = True
    base.call_soon_threadsafe = call_soon_threadsafe


def handle_error(e: BaseException, workdir: str | None) -> None:
    """The one error path: a short message on stderr, the traceback in the
    log file (and on stderr with --verbose), then exit with its code."""
    if isinstance(e, SystemExit):
        raise e
    described = None
    try:
        described = describe_error(e, workdir)
    except Exception:  # noqa: BLE001 - never hide the original error
        described = None
    if isinstance(e, KeyboardInterrupt) and described is None:
        described = (EXIT_INTERRUPTED, "interrupted (a second Ctrl-C): "
                     "stopped without saving; re-run the same command to "
                     "resume from the last complete checkpoint")
    log = _write_traceback(workdir, e)
    verbose = False
    with contextlib.suppress(Exception):
        verbose = bool(_VERBOSE.value)
    if described is None:
        code = EXIT_FAULT
        message = (f"internal error: {type(e).__name__}: "
                   f"{_clean(str(e))[:500]}\nThis is a bug in ssr_jax; "
                   "please report it with the log file.")
    else:
        code, message = described
    if verbose:
        traceback.print_exception(e, file=sys.stderr)
    print(f"ssr_jax: {message}", file=sys.stderr)
    if log and not verbose and code == EXIT_FAULT:
        print(f"(full traceback in {log}; --verbose prints it)",
              file=sys.stderr)
    _exit(code)


# --- main ---------------------------------------------------------------------
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
    workdir = resolve_paths(config, _WORKDIR.value)
    errors = (config_check.command_line_errors(config)
              + config_check.validate(config, check_devices=False))
    if errors:
        _fail("the config is invalid:\n  - " + "\n  - ".join(errors))

    # Heavy imports only after the config is known to be good; multi-host
    # initialisation before anything touches the JAX backend.
    _quiet_closed_event_loops()
    try:
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
        _dispatch(config, workdir)
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - one path
        handle_error(e, workdir)


def _prepare_workdir(workdir: str) -> None:
    """Creates the workdir (a read-only or full disk is a clear error now,
    not after the models load) and starts the log file there."""
    probe = os.path.join(workdir, f".write_test.{os.getpid()}")
    try:
        os.makedirs(workdir, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise OSError(e.errno, e.strerror, workdir) from e
    logging.get_absl_handler().use_absl_log_file("ssr_jax", workdir)


_LOCK = None  # the open lock file of this process's training run


def lock_workdir(workdir: str):
    """Takes `<workdir>/.ssr_jax.lock` (fcntl, released when the process
    ends, even killed); a second training run on the same workdir gets
    WorkdirBusyError instead of racing the first for checkpoints."""
    import fcntl
    import socket
    import time

    path = os.path.join(workdir, ".ssr_jax.lock")
    f = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held open
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise WorkdirBusyError(
            f"workdir {workdir} is in use by another training run "
            f"({holder}). Wait for it to finish or stop it, or use another "
            "--workdir.") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    return f


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
    global _LOCK
    _prepare_workdir(workdir)
    if config.mode == "train":
        import jax
        if jax.process_index() == 0:
            _LOCK = lock_workdir(workdir)
    if specs.get(config.data.name).synthetic:
        from ssr_jax import embedded
        if config.mode == "train":
            (embedded.sweep if config.get("seeds") else embedded.run)(
                config, workdir)
            return
        # eval / pseudo_labels on the synthetic world: the cached world
        # and encoders, then the same code as for real data.
        embedded.prepare(config)
    if config.mode == "train":
        from ssr_jax import evaluate, train
        train.train_and_evaluate(config, workdir,
                                 make_eval_hook=evaluate.make_eval_hook)
    elif config.mode == "eval":
        from ssr_jax import evaluate
        evaluate.evaluate(config, workdir)
    elif config.mode == "pseudo_labels":
        from ssr_jax import evaluate
        evaluate.export_pseudo_labels(config, workdir)


def _fail(message: str) -> None:
    print(f"ssr_jax: {message}", file=sys.stderr)
    sys.exit(EXIT_USER)


def run() -> None:
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
