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
import errno
import os
import re
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

from ssr_jax import cli, config_check
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
EXIT_USER = cli.EXIT_USER  # a mistake in the command, config, data or weights
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


_parse_flags = cli.flags_parser("ssr_jax")


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
    for x in cli.chain(e):
        if isinstance(x, OSError) and x.errno in (
                errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES,
                errno.EPERM):
            return x
    for x in cli.chain(e):
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
    for x in cli.chain(e):
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
                   f"{cli.clean(str(e))[:500]}\nThis is a bug in ssr_jax; "
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
        lines = [ln.strip() for ln in str(cli.innermost(e)).splitlines()]
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
