"""Inputs that hurt the user (issue 13, items 7-11): each is refused with exit 2 and a message that
names the problem and the fix, before any work starts, leaving the inputs untouched and no output."""
from __future__ import annotations

import io
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from clip_poison.io import UserError, atomic_dir, sha256_tree


@pytest.fixture
def world(tiny_world, tmp_path):
    """A private copy of the tiny world: a test that would delete its input must not hit the shared one."""
    return Path(shutil.copytree(tiny_world, tmp_path / "world"))


def fake_poison_set(d: Path, **manifest) -> Path:
    d.mkdir(parents=True)
    m = {"attack": "backdoor", "format": "csv", "csv": "poisons.csv", "mode": "add", "n_poisons": 1,
         "target": {"label": "tent"}, "trigger": {"name": "checkerboard", "patch_size": 4}, **manifest}
    (d / "manifest.json").write_text(json.dumps(m))
    return d


# --- 7. command execution from a manifest -------------------------------------------------------

@pytest.mark.parametrize("shard", ["pipe:touch {mark}", "poisons-000000.tar::pipe:touch {mark}", "/etc/passwd",
                                   "../p2/poisons-000000.tar", "https://example.com/x.tar"],
                         ids=["pipe", "joined-pipe", "absolute", "dotdot", "url"])
def test_manifest_shard_that_is_a_command_or_outside_is_refused(bad_input, tiny_world, tmp_path, shard):
    from clip_poison.data.wds import csv_to_shards

    csv_to_shards(tiny_world / "train.csv", tmp_path / "clean")
    mark = tmp_path / "marker"
    p = fake_poison_set(tmp_path / "p", format="wds", shards=[shard.format(mark=mark)])
    (p / "poisons-000000.tar").write_bytes(b"")
    bad_input(["train", "--data", tmp_path / "clean" / "00000.tar", "--poisons", p, "--backend", "open_clip_train",
               "--out", tmp_path / "v"], what=f"poison manifest shard `{shard.split('{')[0]}…`", kind="unsafe path",
              expect=["not a file inside", "re-craft"])
    assert not mark.exists() and not (tmp_path / "v").exists()


def test_manifest_csv_outside_its_folder_is_refused(bad_input, world, tmp_path):
    p = fake_poison_set(tmp_path / "p", csv="../world/train.csv")
    bad_input(["train", "--data", world / "train.csv", "--poisons", p, "--out", tmp_path / "v"],
              what="poison manifest `csv` outside the poison folder", kind="unsafe path", expect=["'..'", "re-craft"])


# --- 8. path traversal ---------------------------------------------------------------------------

@pytest.mark.parametrize("row", ["../../../../../../etc/passwd", "/etc/passwd"])
def test_poison_csv_row_outside_the_poison_folder_is_refused(bad_input, world, tmp_path, row):
    p = fake_poison_set(tmp_path / "p")
    (p / "poisons.csv").write_text(f"filepath,title\n{row},a tent\n")
    bad_input(["train", "--data", world / "train.csv", "--poisons", p, "--out", tmp_path / "v"],
              what=f"poison CSV row {'relative' if row[0] == '.' else 'absolute'} path outside the poison folder",
              kind="unsafe path", expect=["outside its folder", "re-craft"])
    assert not (tmp_path / "v").exists()


@pytest.fixture
def outside_csv(tiny_world, tmp_path):
    """sub/d.csv naming ../img.png: a real image, one folder above the CSV."""
    shutil.copy(tiny_world / "train" / "000000.png", tmp_path / "img.png")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.csv").write_text("filepath,title\n../img.png,a tent\n../img.png,a tent in the snow\n")
    return tmp_path / "sub" / "d.csv"


def test_user_csv_relative_path_leaving_its_folder_needs_the_flag(bad_input, outside_csv, tmp_path):
    for cmd in (["poison", "backdoor", "--n-poisons", "1"], ["train"]):
        bad_input([*cmd, "--data", outside_csv, "--out", tmp_path / "o"], what="CSV row `../img.png` leaving the CSV's folder",
                  kind="unsafe path", expect=["'../img.png'", "leaves the CSV's folder", "--allow-outside-paths"])
    assert not (tmp_path / "o").exists()


def test_allow_outside_paths_and_absolute_paths_are_the_users_choice(outside_csv, tmp_path):
    from clip_poison.cli import main

    assert main(["poison", "backdoor", "--data", str(outside_csv), "--n-poisons", "1", "--allow-outside-paths",
                 "--out", str(tmp_path / "p1")]) == 0
    absolute = tmp_path / "abs.csv"
    absolute.write_text(f"filepath,title\n{tmp_path / 'img.png'},a tent\n")
    assert main(["poison", "backdoor", "--data", str(absolute), "--n-poisons", "1", "--out", str(tmp_path / "p2")]) == 0


# --- 9. --overwrite must never delete or replace an input ----------------------------------------

def test_out_that_is_or_holds_an_input_is_refused_even_with_overwrite(bad_input, world, tmp_path):
    before = sha256_tree(world)
    csv = world / "train.csv"
    cases = [(["poison", "backdoor", "--data", csv, "--n-poisons", "2", "--out", world], "is the input dataset's folder", "contains"),
             (["poison", "backdoor", "--data", csv, "--n-poisons", "2", "--out", csv], "is the input CSV", "is the input"),
             (["train", "--data", csv, "--out", world], "is the dataset's folder", "contains"),
             (["poison", "targeted", "--data", csv, "--eval-root", world / "eval", "--out", world / "eval" / "p"],
              "is inside the eval set", "is inside")]
    for argv, what, rel in cases:
        bad_input([*argv, "--overwrite"], what=f"`--out` {what} (with --overwrite)", kind="output conflict",
                  expect=[rel, "choose an --out outside every input"])
    bad_input(["poison", "backdoor", "--data", csv, "--n-poisons", "2", "--out", world / "train", "--overwrite"],
              what="`--out` is the dataset's image folder (with --overwrite)", kind="output conflict",
              expect=["clip-poison did not write", "choose a new --out"])
    assert sha256_tree(world) == before and csv.is_file()


def test_out_that_is_a_file_is_never_replaced_by_a_folder(bad_input, world, tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    bad_input(["poison", "backdoor", "--data", world / "train.csv", "--n-poisons", "2", "--out", f, "--overwrite"],
              what="`--out` is an existing file (with --overwrite)", kind="output conflict",
              expect=["is a file", "never replaced by a folder", "choose a new --out"])
    assert f.read_text() == "mine"


def test_evaluate_out_file_is_not_silently_overwritten(bad_input, world, tmp_path):
    f = tmp_path / "result.json"
    f.write_text("{}")
    bad_input(["evaluate", "--checkpoint", tmp_path / "ckpt", "--eval-root", world / "eval", "--out", f],
              what="`evaluate --out` file exists", kind="output conflict", expect=["already exists", "--overwrite"])
    assert f.read_text() == "{}"


# --- 10. fail before the work, not after ----------------------------------------------------------

def test_train_checks_out_before_training(bad_input, world, tmp_path, monkeypatch):
    import clip_poison.victims.fast as fast

    def no_training(*a, **k):
        raise AssertionError("training started before --out was checked")

    monkeypatch.setattr(fast, "train_fast", no_training)
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "keep.txt").write_text("mine")
    bad_input(["train", "--data", world / "train.csv", "--out", tmp_path / "v"], what="`train --out` not empty",
              kind="output conflict", expect=["already exists", "--overwrite"])
    (tmp_path / "file").write_text("x")
    bad_input(["train", "--data", world / "train.csv", "--out", tmp_path / "file" / "v"],
              what="`train --out` under a file (not writable)", kind="output conflict",
              expect=["not a writable folder", "choose an --out"])


def test_world_out_not_writable(bad_input, tmp_path):
    (tmp_path / "file").write_text("x")
    bad_input(["world", "--out", tmp_path / "file" / "w", "--n-train", "10"], what="`--out` under a file (not writable)",
              kind="output conflict", expect=["not a writable folder", "choose an --out"])


def test_oserror_is_a_message_not_a_traceback(bad_input, tmp_path, monkeypatch):
    import clip_poison.data.world as world_mod

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device", str(tmp_path / "w" / "train.csv"))

    monkeypatch.setattr(world_mod, "write_world", disk_full)
    bad_input(["world", "--out", tmp_path / "w"], what="disk full while writing", kind="resource limit",
              expect=["No space left on device", "train.csv", "free space"])


def test_corrupt_or_truncated_weights(bad_input, world, tmp_path):
    import torch

    from clip_poison.victims.export import CONFIG, WEIGHTS, preprocess_cfg
    from clip_poison.victims.models import model_config

    buf = io.BytesIO()
    torch.save({"w": torch.zeros(1000)}, buf)
    for name, data in (("garbage", b"not a checkpoint"), ("truncated", buf.getvalue()[:300])):
        c = tmp_path / name
        c.mkdir()
        (c / CONFIG).write_text(json.dumps({"model_cfg": model_config("rn-tiny-32"), "preprocess_cfg": preprocess_cfg(32)}))
        (c / WEIGHTS).write_bytes(data)
        bad_input(["evaluate", "--checkpoint", c, "--eval-root", world / "eval", "--max-n", "4", "--no-cache"],
                  what=f"{name} checkpoint weights", kind="malformed input", expect=["is damaged", "clip-poison train"])


def test_bad_cls_value(bad_input, world, tmp_path):
    ev = tmp_path / "ev"
    shutil.copytree(world / "eval", ev, ignore=shutil.ignore_patterns("*.tar"))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in (("s0.png", (world / "train" / "000000.png").read_bytes()), ("s0.cls", b"cat\n")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    for f in (ev / "test").glob("*.txt"):
        f.unlink()  # no recorded counts: this split has one shard of one sample
    (ev / "test" / "0.tar").write_bytes(buf.getvalue())
    bad_input(["poison", "targeted", "--data", world / "train.csv", "--eval-root", ev, "--out", tmp_path / "p"],
              what="`.cls` member that is not a number", kind="malformed input", expect=["s0.cls", "one whole number"])


def test_garbage_caption_index(bad_input, world, tmp_path):
    idx = tmp_path / "index.parquet"
    idx.write_bytes(b"garbage, not parquet")
    bad_input(["poison", "backdoor", "--data", world / "train.csv", "--n-poisons", "2", "--caption-index", idx,
               "--out", tmp_path / "p"], what="`--caption-index` file that is not a caption index", kind="malformed input",
              expect=["not a caption index", "delete it"])
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("flags,what,expect", [
    (["--lr", "-1"], "`--lr -1`", "--lr: '-1' is not a finite number > 0"),
    (["--lr", "nan"], "`--lr nan`", "--lr: 'nan' is not a finite number > 0"),
    (["--epochs", "0"], "`--epochs 0`", "--epochs: '0' is not a whole number >= 1"),
    (["--crop-scale", "2", "-1"], "`--crop-scale 2 -1`", "--crop-scale: '2' is not a crop scale in (0, 1]"),
    (["--crop-scale", "1", "0.5"], "`--crop-scale 1 0.5` (LO > HI)", "pass LO <= HI"),
], ids=["lr-negative", "lr-nan", "epochs-0", "crop-out-of-range", "crop-lo-above-hi"])
def test_bad_training_numbers(bad_input, world, tmp_path, flags, what, expect):
    bad_input(["train", "--data", world / "train.csv", *flags, "--out", tmp_path / "v"], what=what,
              kind="invalid value", expect=[expect])
    assert not (tmp_path / "v").exists()


@pytest.mark.parametrize("flags,what,expect", [
    (["--noise-sigma", "nan"], "`--noise-sigma nan`", "--noise-sigma: 'nan' is not a finite number >= 0"),
    (["--n-poisons", "100000000"], "`--n-poisons 100000000` (memory)", "--n-poisons: '100000000' is not a whole number from 1 to 10,000"),
], ids=["noise-nan", "n-poisons-huge"])
def test_bad_targeted_numbers(bad_input, world, tmp_path, flags, what, expect):
    bad_input(["poison", "targeted", "--data", world / "train.csv", "--eval-root", world / "eval", *flags,
               "--out", tmp_path / "p"], what=what, kind="resource limit" if "memory" in what else "invalid value",
              expect=[expect])


def test_targeted_poison_count_is_capped_in_the_library(world, tmp_path):
    from clip_poison.attacks.targeted import craft_targeted_poisons
    from clip_poison.config import TargetedConfig
    from clip_poison.data.evalsets import load_wds_evalset

    ev = load_wds_evalset(world / "eval")
    for cfg in (TargetedConfig(n_poisons=100_000_000), TargetedConfig(noise_sigma=math.nan)):
        with pytest.raises(UserError, match="--n-poisons must be in|--noise-sigma must be a finite"):
            craft_targeted_poisons(cfg, world / "train.csv", ev, tmp_path / "p")
    assert not (tmp_path / "p").exists()


SPEC = "name: s\nattack: backdoor\nseeds: [0]\n"


@pytest.mark.parametrize("body,what,expect", [
    ("base: {train: {epochs: four}}\n", "spec value of the wrong type (`epochs: four`)", "train.epochs must be of type int"),
    ("base: {train: {crop_scale: [1.0, high]}}\n", "spec `crop_scale` not two numbers", "train.crop_scale must be of type"),
    ("axes: {backdoor.n_poisons: [10, '20']}\n", "spec axis value of the wrong type", "backdoor.n_poisons must be of type int"),
    ("axes: [backdoor.n_poisons, 10]\n", "spec `axes` given as a list", "axes must be a mapping"),
    ("n_targets: two\n", "spec `n_targets: two`", "n_targets must be a whole number"),
    ("resources: {num_gpu: 1}\n", "spec `resources` key misspelt (`num_gpu`)", "resources.num_gpu: 1 is not a per-run request"),
], ids=["str-for-int", "crop-pair", "axis-value", "axes-list", "n-targets", "resources-key"])
def test_bad_spec_values(bad_input, tmp_path, body, what, expect):
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC + body)
    bad_input(["sweep", spec, "--dry-run", "--out", tmp_path / "s"], what=what, kind="invalid value", expect=[expect])


def test_backdoor_suggestions_name_its_own_flags(bad_input, world, tmp_path):
    err = bad_input(["poison", "backdoor", "--data", world / "train.csv", "--label", "zebra", "--out", tmp_path / "p"],
                    what="backdoor label with no matching caption", kind="mismatch", expect=["zebra", "--synonyms"])
    assert "--caption-source" not in err  # the backdoor has no such flag


def test_demo_suggestions_name_demo_flags(bad_input, tmp_path):
    err = bad_input(["demo", "--n-train", "50", "--backdoor-poisons", "60", "--out", tmp_path / "d"],
                    what="demo `--backdoor-poisons` above `--n-train`", kind="invalid value",
                    expect=["--backdoor-poisons 60 exceeds --n-train 50"])
    err += bad_input(["demo", "--targeted-poisons", "0", "--out", tmp_path / "d"], what="demo `--targeted-poisons 0`",
                     kind="invalid value", expect=["--targeted-poisons: '0'"])
    assert "--n-poisons" not in err and not (tmp_path / "d").exists()


@pytest.fixture
def tsv(tiny_world, tmp_path):
    rows = (tiny_world / "train.csv").read_text().splitlines()
    lines = ["filepath\ttitle"] + [f"{tiny_world / r.split(',', 1)[0]}\t{r.split(',', 1)[1]}" for r in rows[1:]]
    (tmp_path / "d.tsv").write_text("\n".join(lines) + "\n")
    return tmp_path / "d.tsv"


def test_tab_separated_csv_suggests_the_separator_flag(bad_input, tsv, tmp_path):
    from clip_poison.cli import main

    bad_input(["poison", "backdoor", "--data", tsv, "--n-poisons", "2", "--out", tmp_path / "p"],
              what="tab-separated CSV read as comma-separated", kind="malformed input",
              expect=["looks '\\t'-separated", "--csv-separator"])
    assert main(["poison", "backdoor", "--data", str(tsv), "--csv-separator", "\\t", "--n-poisons", "2",
                 "--out", str(tmp_path / "p")]) == 0


# --- 11. resources and leftovers -----------------------------------------------------------------

def _gone(pid: int, timeout: float = 10.0) -> bool:
    """True once pid has exited (a zombie no reaper collects counts as exited)."""
    end = time.time() + timeout
    while time.time() < end:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX":
                return True
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return True
        time.sleep(0.05)
    return False


SLEEPER = [sys.executable, "-c", "import os, time; print(os.getpid(), flush=True); time.sleep(120)"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_trainer_dies_with_a_killed_parent():
    parent = subprocess.Popen([sys.executable, "-c", (
        "import sys; from clip_poison.victims.openclip_train import run_trainer; "
        f"run_trainer({SLEEPER!r}, None, lambda line: print('CHILD', line, end='', flush=True))")],
        stdout=subprocess.PIPE, text=True)
    try:
        line = parent.stdout.readline()
        assert line.startswith("CHILD"), line
        child = int(line.split()[1])
        parent.send_signal(signal.SIGKILL)  # no finally, no atexit: only the kernel can stop the child
        parent.wait()
        assert _gone(child), "the trainer kept running after its parent was killed"
    finally:
        parent.kill()
        parent.stdout.close()


def test_trainer_is_killed_when_the_parent_stops_reading():
    from clip_poison.victims.openclip_train import run_trainer

    pids = []

    def on_line(line):
        pids.append(int(line))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_trainer(SLEEPER, None, on_line)
    assert _gone(pids[0], timeout=2)


def test_stale_partial_folders_are_cleaned_on_the_next_run(tmp_path):
    host = socket.gethostname()
    dead = tmp_path / f".out.{2**22 + 7}@{host}.abc123.partial"      # owner gone: a killed run's leftover
    live = tmp_path / f".out.{os.getpid()}@{host}.def456.partial"    # a concurrent run still building
    remote = tmp_path / f".out.{2**22 + 7}@other-host.ghi789.partial"  # another host's run: cannot tell
    old = tmp_path / ".out.jkl012.partial"                            # no owner recorded, hours old
    other = tmp_path / ".out.v2.mno345.partial"                       # another output's (out.v2)
    for d in (dead, live, remote, old, other):
        d.mkdir()
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    os.utime(other, (time.time() - 7200, time.time() - 7200))
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "x").write_text("1")
    assert not dead.exists() and not old.exists()
    assert live.exists() and remote.exists() and other.exists()
    assert (tmp_path / "out" / "x").read_text() == "1"
