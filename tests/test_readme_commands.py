"""Every `python -m ssr_jax...` command of README.md, run as written.

The commands are extracted from README.md (fenced blocks and inline code,
backslash continuations joined) and run from a scratch directory holding a
copy of `configs/`, so that relative paths (`--workdir runs/synth`, the
default `runs/<data.name>`, `--config.eval.checkpoint=runs/synth/...`)
behave as they do for a user in a fresh clone. Only what cannot exist
here is substituted:

- the preset: `configs/synthetic.py[:smoke]` -> `configs/synthetic.py:tiny`,
  `configs/voc.py[:paper]` -> `configs/voc.py[:paper],tiny` (same code
  path, seconds instead of minutes);
- dataset roots and weights (`/data/...`, `/weights/...`, `...`) -> the
  fixture trees of tests/data_fixtures.py and tiny random snapshots;
- a checkpoint step (`30000`, `.../checkpoints/100`) -> the step trained;
- a seed sweep (`--config.seeds=0,1,2`) -> its first two seeds.

The embedded default is also preempted (SIGTERM after its first step):
it must exit 75 without evaluating, and the same command must resume and
finish; its results and pictures are checked (this replaces the former
tests/test_embedded.py), and a fresh process must pretrain bitwise-equal
tiny encoders on an equal world (determinism across processes). A README
command this file does not know fails
`test_every_readme_command_is_covered`: add it to `plan()`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
EXIT_PREEMPTED = 75


# --- extraction --------------------------------------------------------------
def _normalise(cmd: str) -> str:
    return " ".join(cmd.replace("\\\n", " ").split())


def readme_commands(text: str | None = None) -> list[str]:
    """Commands of README.md: every line of a fenced shell block, and every
    inline code span holding `python -m ssr_jax` or starting with
    `--config.mode=` (an override of the embedded default's command)."""
    if text is None:
        with open(README, encoding="utf-8") as f:
            text = f.read()
    out = []
    fences = re.compile(r"```(\w*)\n(.*?)```", re.S)
    for lang, body in fences.findall(text):
        if lang not in ("bash", "sh"):
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = _normalise(line)
            if line and not line.startswith("#"):
                out.append(line)
    rest = fences.sub("", text)
    for span in re.findall(r"`([^`]+)`", rest):
        span = _normalise(span)
        if re.search(r"python3? -m ssr_jax", span) or span.startswith(
                "--config.mode="):
            out.append(span)
    return list(dict.fromkeys(out))


# --- planning ----------------------------------------------------------------
@dataclasses.dataclass
class Case:
    readme: str  # as written in the README
    kind: str  # "run" | "skip"
    reason: str = ""
    argv: list[str] = dataclasses.field(default_factory=list)
    dataset: str = ""  # synthetic | voc | coco
    mode: str = "train"  # train | eval | pseudo_labels | build (TFDS)
    workdir: str = ""  # as given (relative), "" = default
    source: str = "folders"  # data.source
    module: str = "ssr_jax.main"

    @property
    def effective_workdir(self) -> str:
        """What main makes of it (relative to the cwd): runs/<data.name>
        by default."""
        return self.workdir or f"runs/{self.dataset}"


EMBEDDED = "python -m ssr_jax.main --config configs/synthetic.py"
SKIPS = {
    "pip install": "installation (the test environment is installed)",
    "python -m pytest": "the test suite itself",
    "launch/": "TPU/GPU launch scripts need gcloud / SLURM / an "
               "accelerator; their dry runs are tested with fake tools in "
               "tests/test_launch.py",
}


def _config_arg(value: str) -> tuple[str, str]:
    """(dataset, substituted --config value)."""
    path, _, variant = value.partition(":")
    name = os.path.basename(path)[:-3]
    if name == "synthetic":
        return name, "configs/synthetic.py:tiny"
    parts = [p for p in variant.split(",") if p and p != "tiny"]
    return name, f"configs/{name}.py:" + ",".join(parts + ["tiny"])


def plan(cmd: str) -> Case:
    for prefix, reason in SKIPS.items():
        if cmd.startswith(prefix):
            return Case(cmd, "skip", reason)
    if cmd.startswith("--config.mode="):
        cmd_run = f"{EMBEDDED} --workdir runs/synth {cmd}"
    else:
        cmd_run = cmd
    # `XDG_CACHE_HOME=... /usr/bin/time -v python3 -m ...` (measurements)
    words = shlex.split(cmd_run)
    while words and re.match(r"^[A-Z_]+=", words[0]):
        words.pop(0)
    if words[:2] == ["/usr/bin/time", "-v"]:
        words = words[2:]
    if words and words[0] == "python3":
        words[0] = "python"
    if words == ["python", "-m", "ssr_jax.main"]:
        return Case(cmd, "skip", "the entry point named in prose (no "
                    "arguments), not a command")
    module = words[2] if len(words) > 2 and words[:2] == ["python",
                                                          "-m"] else ""
    if module not in ("ssr_jax.main", "ssr_jax.data.build"):
        raise KeyError(cmd)
    args = words[3:]
    case = Case(cmd, "run")
    case.module = module
    if module == "ssr_jax.data.build":
        case.mode = "build"
    out = []
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("[") and a.endswith("]"):
            i += 1  # an optional flag ([--config.eval.crf=True]): left out
            continue
        if a in ("--config", "--workdir") and i + 1 < len(args):
            a, i = f"{a}={args[i + 1]}", i + 1
        key, _, value = a.partition("=")
        if key == "--config":
            case.dataset, value = _config_arg(value)
            a = f"--config={value}"
        elif key == "--workdir":
            case.workdir = value
        elif key == "--config.mode":
            case.mode = value
        elif key == "--config.data.source":
            case.source = value
        elif key == "--config.data.tfds_dir":
            a = f"{key}={{tfds_dir}}"
        elif key in ("--config.data.root", "--config.model.clip_path",
                     "--config.model.dino_path"):
            a = f"{key}={{{key.rsplit('.', 1)[1]}}}"
        elif key == "--config.seeds":
            a = f"{key}={','.join(value.split(',')[:2])}"
        elif key == "--config.eval.checkpoint":
            a = key + "=" + re.sub(r"\d+$", "{step}", value)
        elif a == "...":
            a = None
        if a is not None:
            out.append(a)
        i += 1
    if case.dataset != "synthetic" and case.mode != "build":
        have = {x.split("=", 1)[0] for x in out}
        for key in ("root", "clip_path", "dino_path"):
            if key == "root" and case.source == "tfds":
                continue  # the TFDS dataset replaces data.root
            full = ("--config.data." if key == "root"
                    else "--config.model.") + key
            if full not in have:
                out.append(f"{full}={{{key}}}")
    case.argv = out
    if case.workdir.startswith("/"):
        # Measurement variants (absolute /tmp workdir, a timing wrapper, a
        # cache override): the same command runs with runs/synth below.
        case.kind, case.reason = "skip", (
            "measurement variant of the embedded default (absolute /tmp "
            "workdir, timing wrapper); run below with --workdir runs/synth")
    return case


def test_every_readme_command_is_covered():
    cases = [plan(c) for c in readme_commands()]
    runs = [c for c in cases if c.kind == "run"]
    # The commands this file runs (see the slow tests below).
    keys = {(c.dataset, c.mode, c.effective_workdir, c.source)
            for c in runs}
    f, t = "folders", "tfds"
    assert keys <= {
        ("synthetic", "train", "runs/synth", f),
        ("synthetic", "train", "runs/smoke", f),
        ("synthetic", "train", "runs/synth_seeds", f),
        ("synthetic", "train", "runs/synth_encoders", f),
        ("synthetic", "eval", "runs/synth", f),
        ("synthetic", "pseudo_labels", "runs/synth", f),
        ("voc", "train", "runs/voc", f),
        ("voc", "eval", "runs/voc", f),
        ("voc", "pseudo_labels", "runs/voc", f),
        ("coco", "train", "runs/coco", f),
        ("voc", "build", "runs/voc", f),
        ("voc", "train", "runs/voc", t),
    }, keys
    assert ("synthetic", "train", "runs/synth", f) in keys
    assert ("voc", "eval", "runs/voc", f) in keys
    for c in cases:
        if c.kind == "skip":
            assert c.reason, c
    # Relative workdirs are what the README shows: the test runs them so.
    assert all(not c.workdir.startswith("/") for c in runs)


def test_extraction_joins_continuations_and_inline_spans():
    text = ("x\n```bash\npython -m ssr_jax.main --config a.py \\\n"
            "    --workdir runs/a\n```\nsee `python -m ssr_jax.main\n"
            "--config b.py` and `--config.mode=eval --config.x=1`.\n"
            "```\nnot a shell block\n```\n")
    assert readme_commands(text) == [
        "python -m ssr_jax.main --config a.py --workdir runs/a",
        "python -m ssr_jax.main --config b.py",
        "--config.mode=eval --config.x=1"]
    case = plan("python -m ssr_jax.main --config configs/voc.py --workdir "
                "runs/voc --config.mode=eval --config.eval.checkpoint=30000 "
                "--config.data.root=... [--config.eval.crf=True]")
    assert case.argv == ["--config=configs/voc.py:tiny",
                         "--workdir=runs/voc", "--config.mode=eval",
                         "--config.eval.checkpoint={step}",
                         "--config.data.root={root}",
                         "--config.model.clip_path={clip_path}",
                         "--config.model.dino_path={dino_path}"]


# --- running -----------------------------------------------------------------
def _env(cache) -> dict[str, str]:
    # One CPU device, as a user runs it (conftest's 8 fake devices would
    # refuse the tiny batch); other XLA flags kept.
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                     if "xla_force_host_platform_device_count" not in f)
    return dict(os.environ, PYTHONPATH=ROOT, XDG_CACHE_HOME=str(cache),
                JAX_PLATFORMS="cpu", XLA_FLAGS=flags, PYTHONUNBUFFERED="1")


def _user_dir(tmp_path) -> str:
    """A scratch 'clone': configs/ copied, nothing else; the cwd."""
    cwd = tmp_path / "clone"
    shutil.copytree(os.path.join(ROOT, "configs"), cwd / "configs")
    return str(cwd)


def _argv(case: Case, **values) -> list[str]:
    return [sys.executable, "-m", case.module,
            *(a.format(**values) for a in case.argv)]


def _run(case, cwd, env, timeout=600, **values):
    r = subprocess.run(_argv(case, **values), cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, (case.readme, r.stdout[-2000:],
                               r.stderr[-4000:])
    return r


def _cases(dataset: str, source: str = "folders"
           ) -> dict[tuple[str, str], Case]:
    out = {}
    for c in map(plan, readme_commands()):
        if c.kind == "run" and c.dataset == dataset and c.source == source:
            out.setdefault((c.mode, c.effective_workdir), c)
    return out


def _steps(workdir: str) -> list[int]:
    return sorted(int(p) for p in os.listdir(os.path.join(workdir,
                                                          "checkpoints"))
                  if p.isdigit())


@pytest.mark.slow(seconds=200)  # scheduling weight (tests/conftest.py)
def test_readme_embedded_commands(tmp_path):
    """The embedded default as the README shows it (relative workdir),
    preempted and resumed; eval and pseudo labels on its checkpoint; the
    smoke variant; the seed sweep and the encoder sweep."""
    import preemption_utils  # noqa: PLC0415 - tests/ on sys.path

    cases = _cases("synthetic")
    cwd, env = _user_dir(tmp_path), _env(tmp_path / "cache")
    train = cases[("train", "runs/synth")]
    workdir = os.path.join(cwd, "runs", "synth")

    # SIGTERM after the first step: saved, stopped, nothing evaluated.
    first = preemption_utils.preempt(
        _argv(train), marker=re.compile(r"^step 1\b"), timeout=900,
        extra_env=_env(tmp_path / "cache"), cwd=cwd)
    assert first.returncode == EXIT_PREEMPTED, (first.stdout[-2000:],
                                                first.stderr[-4000:])
    assert "preempted at step" in first.stdout
    assert "Re-run the same command to resume" in first.stderr
    assert "Traceback" not in first.stderr
    assert "== eval" not in first.stdout
    assert not os.path.exists(os.path.join(workdir, "results.json"))
    stopped = int(re.search(r"preempted at step (\d+)",
                            first.stdout).group(1))
    assert stopped in _steps(workdir)

    # The same command resumes and finishes (eval, seeds, pictures).
    r = _run(train, cwd, env)
    assert f"resumed from step {stopped}" in r.stderr
    with open(os.path.join(workdir, "results.json")) as f:
        res = json.load(f)
    _check_results(res, r.stdout, workdir)
    steps = _steps(workdir)
    assert steps[-1] == res["steps"]
    records = [json.loads(ln) for ln in open(
        os.path.join(workdir, "metrics.jsonl")) if ln.strip()]
    logged = [rec["step"] for rec in records if "scalars" in rec]
    assert logged == sorted(set(logged)), logged  # no step twice
    scalars = [rec["scalars"] for rec in records if "scalars" in rec]
    assert scalars and "loss" in scalars[-1]
    steps_logged = [rec["step"] for rec in records]
    assert steps_logged == sorted(steps_logged), steps_logged
    # backend, versions and the XLA self-check (ssr_jax/xla_guard.py)
    assert res["xla"]["self_check"]["ok"] and res["xla"]["jaxlib"]
    assert res["xla"]["backend"] == "cpu"
    xla = [json.loads(rec["text"]["xla"]) for rec in records
           if "xla" in rec.get("text", {})]
    assert xla and xla[0]["self_check"]["ok"]
    assert "XLA self-check on cpu" in r.stderr

    # Eval and pseudo labels on the saved checkpoint, as written.
    _run(cases[("eval", "runs/synth")], cwd, env)
    with open(os.path.join(workdir, "eval", "val", "metrics.json")) as f:
        assert json.load(f)["checkpoint"]["step"] == steps[-1]
    _run(cases[("pseudo_labels", "runs/synth")], cwd, env, step=steps[-1])
    labels = os.path.join(workdir, "pseudo_labels", "train", "labels")
    assert os.listdir(labels)

    # The smoke command (same path, another relative workdir) reuses the
    # cached world and encoders.
    smoke = cases.get(("train", "runs/smoke"))
    if smoke is not None:
        _run(smoke, cwd, env)
        with open(os.path.join(cwd, "runs", "smoke", "results.json")) as f:
            res2 = json.load(f)
        assert res2["time_s"]["pretrain"] < 5.0
        assert res2["encoders"] == res["encoders"]

    # The seed sweep (2 seeds): seed 0 equals the run above.
    sweep = cases.get(("train", "runs/synth_seeds"))
    assert sweep is not None, "README lost the seed-sweep command"
    _check_seed_sweep(sweep, cwd, env, res)
    encoders = cases.get(("train", "runs/synth_encoders"))
    assert encoders is not None, "README lost the encoder-sweep command"
    _check_encoder_sweep(encoders, cwd, env, res)

    # Deterministic across processes: a fresh process (another hash seed,
    # an empty cache) generates the same world and pretrains bitwise-equal
    # encoders (issue 14: two runs of the full default disagreed).
    other = _pretrain_elsewhere(tmp_path / "cache2")
    mine = [res["world"], res["encoders"]["clip"], res["encoders"]["dino"]]
    for x, y in zip(mine, other, strict=True):
        assert x != y
        fx, fy = _files(x), _files(y)
        assert sorted(fx) == sorted(fy) and fx
        differ = [k for k in fx if fx[k] != fy[k]]
        assert not differ, (x, differ[:10])


def _check_seed_sweep(sweep: Case, cwd: str, env: dict[str, str],
                      reference: dict) -> None:
    """The README's seed sweep (2 tiny seeds, the cache of the runs
    above): seed<N>/ workdirs and sweep.json with mean ± sd and verdicts;
    seed 0's results equal `reference` (the default run, seed 0) but for
    timings; the same command again reuses both seeds; a changed config
    refuses the old results."""
    assert "--config.seeds=0,1" in sweep.argv, sweep.argv
    workdir = os.path.join(cwd, sweep.effective_workdir)
    r = _run(sweep, cwd, env)
    with open(os.path.join(workdir, "sweep.json")) as f:
        summary = json.load(f)
    assert summary["training_seeds"] == [0, 1] and summary["reused"] == []
    per_seed = []
    for s in (0, 1):
        with open(os.path.join(workdir, f"seed{s}", "results.json")) as f:
            per_seed.append(json.load(f))
        assert per_seed[-1]["seed"] == s
    row = summary["rows"]["CAM seeds (train): + superpixel mask (SGC)"]
    assert row["values"] == [p["seeds"]["sgc"] for p in per_seed]
    assert set(summary["orderings"]) == set(per_seed[0]["orderings"])
    for name, o in summary["orderings"].items():
        assert o["holds_per_seed"] == [p["orderings"][name]
                                       for p in per_seed]
        assert o["verdict"] in ("holds", "fails", "undecided")
    assert "mean ± sd" in r.stdout and "per-seed differences" in r.stdout

    # Seed 0 of the sweep is exactly the single run (seed 0 by default).
    def untimed(res):
        res = dict(res, time_s=None, xla=dict(res["xla"]))
        res["xla"]["self_check"] = dict(res["xla"]["self_check"],
                                        seconds=None)
        return res

    assert untimed(per_seed[0]) == untimed(reference)

    # The same command again: both seeds reused, nothing trained.
    r2 = _run(sweep, cwd, env)
    assert "reusing" in r2.stdout and "== train" not in r2.stdout
    with open(os.path.join(workdir, "sweep.json")) as f:
        again = json.load(f)
    assert again["reused"] == [0, 1]
    assert again["rows"] == summary["rows"]

    # Another config on the same workdir: refused, nothing overwritten.
    other = subprocess.run(_argv(sweep) + ["--config.train.num_steps=3"],
                           cwd=cwd, env=env, capture_output=True, text=True,
                           timeout=600)
    assert other.returncode == 2, other.stderr[-2000:]
    assert "exists from another config" in other.stderr
    assert "Traceback" not in other.stderr


def _check_encoder_sweep(sweep: Case, cwd: str, env: dict[str, str],
                         reference: dict) -> None:
    """The README's encoder sweep (2 tiny seeds): seed 0 is the default
    run exactly (pretrain.seed 0 is the default's), seed 1 pretrains its
    own encoders (other files, other plain-CLIP CAM) into the cache."""
    assert "--config.sweep_encoders=True" in sweep.argv, sweep.argv
    workdir = os.path.join(cwd, sweep.effective_workdir)
    r = _run(sweep, cwd, env)
    with open(os.path.join(workdir, "sweep.json")) as f:
        summary = json.load(f)
    assert summary["sweep_encoders"] is True
    assert summary["training_seeds"] == [0, 1]
    enc = summary["encoders"]
    assert enc["0"] == reference["encoders"]
    for kind in ("clip", "dino"):
        assert enc["1"][kind] != enc["0"][kind]
        f0, f1 = _files(enc["0"][kind]), _files(enc["1"][kind])
        assert f0 and f1 and f0 != f1
    with open(os.path.join(workdir, "seed0", "results.json")) as f:
        seed0 = json.load(f)
    assert seed0["config_hash"] == reference["config_hash"]
    assert seed0["seeds"] == reference["seeds"]
    row = summary["rows"]["CAM seeds (train): initial CAM, plain CLIP"]
    assert row["values"][0] == reference["cmpa"]["initial_cam_without"]
    assert row["values"][1] != row["values"][0]  # other encoders
    assert "pretrained its own encoders" in r.stdout


def _check_results(res: dict, stdout: str, workdir: str) -> None:
    """results.json and the PNGs of an embedded run are sane."""
    import math  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415

    def unit(x):
        return x is None or (isinstance(x, float) and 0.0 <= x <= 1.0)

    assert 0.0 <= res["val"]["miou"] <= 1.0
    assert unit(res["val"]["miou_all_classes"])
    assert res["val"]["images"]["scored"] >= 1
    for key in ("initial_cam", "clip_attn", "clip_dino", "sgc",
                "pseudo_labels"):
        assert 0.0 <= res["seeds"][key] <= 1.0, key
    for key in ("initial_cam_without", "initial_cam_with"):
        assert 0.0 <= res["cmpa"][key] <= 1.0, key
    assert res["per_class_iou"] and all(
        unit(v) for v in res["per_class_iou"].values())
    assert set(res["orderings"]) == {
        "sgc > clip_dino", "clip_dino > clip_attn",
        "clip_attn > initial_cam", "initial_cam_with > initial_cam_without"}
    for stage in ("world", "pretrain", "train", "eval", "seeds", "total"):
        assert math.isfinite(res["time_s"][stage]) and (
            res["time_s"][stage] >= 0)
    assert "mIoU %" in stdout and "segmentation (val" in stdout
    assert "images scored: val" in stdout
    for png in ("cam_overlays.png", "predictions.png", "loss_curves.png"):
        with Image.open(os.path.join(workdir, png)) as im:
            a = np.asarray(im)
        assert a.ndim == 3 and a.shape[0] > 8 and a.std() > 0, png


_PRETRAIN = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("cfg", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
c = module.get_config("tiny")
from ssr_jax import pretrain
root = pretrain.ensure_world(c)
print(json.dumps([root, *pretrain.ensure_encoders(c, root)]))
"""


def _pretrain_elsewhere(cache) -> list[str]:
    env = dict(_env(cache), PYTHONHASHSEED="12345")
    r = subprocess.run(
        [sys.executable, "-c", _PRETRAIN,
         os.path.join(ROOT, "configs", "synthetic.py")],
        env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _files(directory: str) -> dict[str, bytes]:
    """Every file under `directory` but the run records (timings, paths)."""
    out = {}
    for d, _, names in os.walk(directory):
        for n in names:
            if n in ("pretrain.json", "world.json"):
                continue
            p = os.path.join(d, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, directory)] = f.read()
    return out


@pytest.mark.slow(seconds=105)
def test_readme_real_data_commands(tmp_path):
    """The VOC commands (train, eval, pseudo labels) and the COCO one on
    fixture trees in the real layouts and tiny random snapshots, from a
    scratch directory with the README's relative workdirs."""
    sys.path.insert(0, os.path.dirname(__file__))
    import data_fixtures  # noqa: PLC0415
    import ssr_fixtures  # noqa: PLC0415

    from ssr_jax import text  # noqa: PLC0415

    cwd, env = _user_dir(tmp_path), _env(tmp_path / "cache")
    voc_tree = data_fixtures.write_voc_tree(str(tmp_path / "VOC2012"))
    clip, dino = ssr_fixtures.make_tiny_encoders(
        str(tmp_path / "weights"), text.VOC_FG_PROMPTS + text.VOC_BG_PROMPTS
        + text.COCO_FG_PROMPTS)
    values = {"root": voc_tree.root, "clip_path": clip, "dino_path": dino}
    cases = _cases("voc")
    _run(cases[("train", "runs/voc")], cwd, env, **values)
    workdir = os.path.join(cwd, "runs", "voc")
    steps = _steps(workdir)
    assert steps
    _run(cases[("eval", "runs/voc")], cwd, env, step=steps[-1], **values)
    with open(os.path.join(workdir, "eval", "val", "metrics.json")) as f:
        assert json.load(f)["checkpoint"]["step"] == steps[-1]
    _run(cases[("pseudo_labels", "runs/voc")], cwd, env, **values)
    assert os.listdir(os.path.join(workdir, "pseudo_labels", "train",
                                   "labels"))

    coco = _cases("coco").get(("train", "runs/coco"))
    if coco is not None:  # no --workdir: the default runs/coco
        tree = data_fixtures.write_coco_tree(str(tmp_path / "coco"))
        _run(coco, cwd, env, root=tree.root, clip_path=clip,
             dino_path=dino)
        assert _steps(os.path.join(cwd, "runs", "coco"))


@pytest.mark.slow
def test_readme_tfds_commands(tmp_path):
    """The TFDS section: build the VOC fixture into a TFDS data dir, then
    train from it (`--config.data.source=tfds`), from a scratch clone."""
    pytest.importorskip("tensorflow_datasets",
                        reason="pip install -r requirements-tfds.txt")
    sys.path.insert(0, os.path.dirname(__file__))
    import data_fixtures  # noqa: PLC0415
    import ssr_fixtures  # noqa: PLC0415

    from ssr_jax import text  # noqa: PLC0415

    cases = {**_cases("voc"), **{(m, w + ":tfds"): c for (m, w), c in
                                 _cases("voc", "tfds").items()}}
    build = cases[("build", "runs/voc")]
    train = cases[("train", "runs/voc:tfds")]
    cwd, env = _user_dir(tmp_path), _env(tmp_path / "cache")
    tree = data_fixtures.write_voc_tree(str(tmp_path / "VOC2012"))
    clip, dino = ssr_fixtures.make_tiny_encoders(
        str(tmp_path / "weights"), text.VOC_FG_PROMPTS + text.VOC_BG_PROMPTS)
    values = {"root": tree.root, "clip_path": clip, "dino_path": dino,
              "tfds_dir": "tfds"}  # relative, as a user may write it
    _run(build, cwd, env, **values)
    assert os.path.isdir(os.path.join(cwd, "tfds"))
    _run(train, cwd, env, **values)
    assert _steps(os.path.join(cwd, "runs", "voc"))
