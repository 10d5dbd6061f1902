"""The one error path of `python -m ssr_jax.main` (docs/errors.md): every
user-facing error is a short message with the fix on stderr and exit 2
(user error) or 1 (fault); the traceback goes to the log file only (or to
stderr with --verbose). One test per row of docs/errors.md; each triggers
its error before any heavy work where it can."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from ssr_jax import checkpointing, config_check, main
from ssr_jax.data import DataError
from ssr_jax.models.loading import WeightsError
from tests import data_fixtures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOC_TINY = os.path.join(ROOT, "configs", "voc.py") + ":tiny"


def _env():
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                     if "xla_force_host_platform_device_count" not in f)
    return dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
                XLA_FLAGS=flags)


def _main(*args, patch: str = "", cwd=ROOT, timeout=300):
    """`python -m ssr_jax.main ARGS`, after running `patch` (Python code
    that replaces a function, e.g. a writer that raises ENOSPC)."""
    code = (f"import sys\n{patch}\nfrom ssr_jax import main\n"
            f"sys.argv = ['ssr_jax.main'] + {list(args)!r}\nmain.run()\n")
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def _short(r, code, *needles):
    assert r.returncode == code, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines()
             if ln.strip() and ln.startswith(("ssr_jax", "(", "  "))]
    assert 1 <= len(lines) <= 14, r.stderr[-3000:]
    for needle in needles:
        assert needle in r.stderr, (needle, r.stderr[-3000:])


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    d = tmp_path_factory.mktemp("errors")
    t = data_fixtures.write_voc_tree(str(d / "voc"))
    clip = d / "clip"
    clip.mkdir()
    dino = d / "dino"
    dino.mkdir()
    return t, str(clip), str(dino)


def _voc(tree, workdir, *extra):
    t, clip, dino = tree
    return ("--config", VOC_TINY, f"--workdir={workdir}",
            f"--config.data.root={t.root}", f"--config.model.clip_path={clip}",
            f"--config.model.dino_path={dino}",
            f"--config.data.cache_dir={workdir}.cache",  # a fresh scan
            "--config.data.train_split=train", *extra)


# --- rows of docs/errors.md --------------------------------------------------
def test_missing_split_list_is_found_before_any_model(tree, tmp_path):
    r = _main(*_voc(tree, tmp_path / "w", "--config.data.train_split="
                    "train_aug2"))
    _short(r, 2, "split list", "train_aug2.txt does not exist",
           "lists present: train, train_aug, val")
    assert not (tmp_path / "w").exists()  # refused before anything started


def test_data_error_is_short(tmp_path):
    t = data_fixtures.write_voc_tree(str(tmp_path / "voc"),
                                     broken=("truncated_jpeg",))
    r = _main("--config", VOC_TINY, f"--workdir={tmp_path / 'w'}",
              f"--config.data.root={t.root}",
              f"--config.model.clip_path={tmp_path}",
              f"--config.model.dino_path={tmp_path}",
              "--config.data.train_split=train_aug")
    _short(r, 2, "ssr_jax: data problem:", "truncated JPEG",
           "data.strict=False", "docs/data.md")
    log = (tmp_path / "w" / "logs" / "ssr_jax.0.log").read_text()
    assert "Traceback" in log and "DataError" in log


def test_weights_error_is_short(tree, tmp_path):
    # An empty snapshot directory: found when the loader opens it.
    r = _main(*_voc(tree, tmp_path / "w"))
    _short(r, 2, "ssr_jax: cannot load the weights:", "config.json")


def test_verbose_prints_the_traceback(tree, tmp_path):
    r = _main(*_voc(tree, tmp_path / "w"), "--verbose")
    assert r.returncode == 2
    assert "Traceback" in r.stderr and "WeightsError" in r.stderr


@pytest.mark.parametrize("err,code,needles", [
    (errno.ENOSPC, 1, ("disk full while writing", "free some space",
                       "resumes from the last complete checkpoint")),
    (errno.EROFS, 2, ("cannot write", "Read-only file system",
                      "writable --workdir")),
])
def test_disk_full_and_read_only_writes(tree, tmp_path, err, code, needles):
    # The label cache is the first file a run writes after the workdir.
    patch = ("import errno, os\nfrom ssr_jax.data import splits\n"
             "def boom(path, obj):\n"
             f"    raise OSError({err}, os.strerror({err}), path)\n"
             "splits._write_json = boom\n")
    r = _main(*_voc(tree, tmp_path / "w"), patch=patch)
    _short(r, code, *needles)
    assert "Event loop is closed" not in r.stderr


def test_read_only_workdir_is_refused_at_once(tree, tmp_path):
    patch = ("import errno, os\nreal = os.makedirs\n"
             "def makedirs(p, *a, **k):\n"
             f"    if str(p).startswith({str(tmp_path / 'ro')!r}):\n"
             "        raise OSError(errno.EROFS, os.strerror(errno.EROFS), p)\n"
             "    return real(p, *a, **k)\n"
             "os.makedirs = makedirs\n")
    r = _main(*_voc(tree, tmp_path / "ro" / "w"), patch=patch)
    _short(r, 2, f"cannot write {tmp_path / 'ro' / 'w'}",
           "Read-only file system")


def test_workdir_lock_refuses_a_second_run(tmp_path):
    held = main.lock_workdir(str(tmp_path))
    try:
        with pytest.raises(main.WorkdirBusyError,
                           match=r"in use by another training run \(pid "
                                 rf"{os.getpid()} .*another --workdir"):
            main.lock_workdir(str(tmp_path))
    finally:
        held.close()
    main.lock_workdir(str(tmp_path)).close()  # free again


@pytest.mark.parametrize("error,code,needle", [
    (config_check.ConfigError("sgc.clip_layers=9: CLIP has 4 blocks"), 2,
     "sgc.clip_layers=9"),
    (DataError("corrupt image /d/x.jpg: truncated JPEG"), 2,
     "data problem: corrupt image"),
    (WeightsError("'/w' has no config.json"), 2,
     "cannot load the weights: '/w' has no config.json"),
    (checkpointing.CheckpointMismatchError("shape of params/x"), 2,
     "checkpoint does not fit the config: shape of params/x"),
    (checkpointing.CheckpointError("no checkpoint in /w/checkpoints"), 2,
     "checkpoint problem"),
    (FloatingPointError("non-finite ['loss'] between steps 10 and 20"), 1,
     "training diverged: non-finite"),
    (main.WorkdirBusyError("workdir /w is in use"), 2, "is in use"),
    (checkpointing.PreemptedError("stopped by SIGTERM at step 3"), 75,
     "stopped by SIGTERM"),
    (OSError(errno.ENOSPC, "No space left on device", "/w/x"), 1,
     "disk full while writing /w/x"),
    (OSError(errno.EROFS, "Read-only file system", "/w"), 2,
     "cannot write /w: Read-only file system"),
    (PermissionError(errno.EACCES, "Permission denied", "/w/c"), 2,
     "cannot write /w/c: Permission denied"),
])
def test_describe_error_rows(error, code, needle):
    got = main.describe_error(error, "/w")
    assert got is not None and got[0] == code, got
    assert needle in got[1], got


def test_tensorstore_disk_full_text_is_recognised():
    # What Orbax raised when a checkpoint filled a 64 kB tmpfs.
    e = ValueError(
        'RESOURCE_EXHAUSTED: Error writing local file "/c/1.orbax-checkpoint'
        '-tmp/state/_sharding": Failed writing: "/c/x.__lock": Failed to '
        'write 51021 bytes')
    code, message = main.describe_error(e)
    assert code == 1
    assert message.startswith("disk full while writing /c/1.orbax-")


def test_closed_event_loop_callbacks_are_dropped():
    import asyncio

    main._quiet_closed_event_loops()
    loop = asyncio.new_event_loop()
    loop.close()
    assert loop.call_soon_threadsafe(print) is None  # was: RuntimeError
    loop = asyncio.new_event_loop()
    try:
        assert loop.call_soon_threadsafe(print) is not None
    finally:
        loop.close()


def test_errors_wrapped_by_other_libraries_are_found():
    # Orbax's async save re-raises the OSError inside its own errors.
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/w/c")
        except OSError as inner:
            raise RuntimeError("async save failed") from inner
    except RuntimeError as e:
        assert main.describe_error(e)[0] == 1
    assert main.describe_error(RuntimeError("a bug")) is None


def test_handle_error_is_short_and_logs_the_traceback(tmp_path, capsys,
                                                      monkeypatch):
    codes = []
    monkeypatch.setattr(main, "_exit", codes.append)
    try:
        raise DataError("corrupt mask /d/m.png")
    except DataError as e:
        main.handle_error(e, str(tmp_path))
    err = capsys.readouterr().err
    assert codes == [2]
    assert err.startswith("ssr_jax: data problem: corrupt mask /d/m.png")
    assert "Traceback" not in err
    log = (tmp_path / "logs" / "ssr_jax.0.log").read_text()
    assert "Traceback" in log and "corrupt mask" in log
    # An unexpected exception (a bug) is exit 1, named, traceback logged.
    try:
        raise KeyError("x")
    except KeyError as e:
        main.handle_error(e, str(tmp_path))
    assert codes[-1] == 1
    err = capsys.readouterr().err
    assert "internal error: KeyError" in err
    assert "full traceback in" in err  # faults name the log file
    # A second Ctrl-C.
    main.handle_error(KeyboardInterrupt(), str(tmp_path))
    assert codes[-1] == 130


def test_docs_table_lists_every_exit_code():
    with open(os.path.join(ROOT, "docs", "errors.md"), encoding="utf-8") as f:
        doc = f.read()
    for code in ("| 1 |", "| 2 |", "| 75 |", "| 130 |"):
        assert code in doc, code
    for needle in ("disk full while writing", "cannot write",
                   "data problem:", "cannot load the weights:",
                   "checkpoint does not fit the config:",
                   "training diverged:", "is in use by another training run",
                   "split list", "Re-run the same command to resume",
                   "internal error"):
        assert needle in doc, needle


def test_data_corrupted_after_the_scan_is_a_short_error(tmp_path):
    """A file edited in place after the (cached) scan is found when it is
    read mid-training: the DataError reaches the one error path."""
    from ssr_jax import input_pipeline

    tree = data_fixtures.write_voc_tree(str(tmp_path / "voc"))
    c = data_fixtures.fixture_config(
        tree, **{"data.cache_dir": str(tmp_path / "cache")})
    input_pipeline.data_sources.load_split(c, "train_aug")  # scanned and cached
    for name in tree.splits["train_aug"]:
        with open(tree.image(name), "r+b") as f:
            f.truncate(os.path.getsize(tree.image(name)) // 2)
    it = input_pipeline.train_iterator(c, process_index=0, process_count=1)
    with pytest.raises(DataError) as e:
        for _ in range(4):
            next(it)
    it.close()
    code, message = main.describe_error(e.value)
    assert code == 2
    assert message.startswith("data problem: corrupt image ")
    assert "docs/data.md" in message
