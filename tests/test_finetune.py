"""Fine-tuning from a checkpoint (`train --init`) and the fine-tuning threat model's data split."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from clip_poison.cli import main
from clip_poison.data.csvdata import read_csv_dataset
from clip_poison.io import sha256_tree

TINY = ["--epochs", "1", "--batch-size", "64"]


@pytest.fixture(scope="module")
def base_ckpt(tiny_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("init") / "v0"
    assert main(["train", "--data", str(tiny_world / "train.csv"), "--out", str(out), *TINY]) == 0
    return out


def _params(ckpt) -> dict:
    sd = torch.load(ckpt / "open_clip_pytorch_model.bin", weights_only=True)
    # BatchNorm running statistics move with every forward pass in train mode, whatever the lr
    return {k: v for k, v in sd.items() if "running_" not in k and "num_batches" not in k}


@pytest.mark.parametrize("backend", ["fast", "open_clip_train"])
def test_init_starts_from_the_checkpoint_on_both_backends(tiny_world, base_ckpt, tmp_path, backend):
    """At a vanishing lr the fine-tuned weights are the checkpoint's; from scratch they are not."""
    before = sha256_tree(base_ckpt)
    out, scratch = tmp_path / "ft", tmp_path / "scratch"
    common = ["train", "--data", str(tiny_world / "train.csv"), *TINY, "--lr", "1e-12", "--backend", backend]
    assert main([*common, "--init", str(base_ckpt), "--out", str(out)]) == 0
    assert main([*common, "--seed", "5", "--out", str(scratch)]) == 0
    a, b, c = _params(base_ckpt), _params(out), _params(scratch)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-8
    assert max((a[k] - c[k]).abs().max().item() for k in a) > 1e-2
    info = json.loads((out / "train.json").read_text())
    assert info["init"]["path"] == str(base_ckpt.resolve())
    assert len(info["init"]["weights_sha256"]) == 64
    assert sha256_tree(base_ckpt) == before  # the checkpoint is only read


def test_init_refuses_another_architecture(tiny_world, base_ckpt, tmp_path, bad_input):
    for init in (base_ckpt, base_ckpt / "open_clip_pytorch_model.bin"):
        for backend in ("fast", "open_clip_train"):
            bad_input(["train", "--data", tiny_world / "train.csv", "--out", tmp_path / "v", "--init", init,
                       "--model", "vit-1m-32", "--backend", backend, *TINY],
                      what="`--init` checkpoint of another architecture than --model", kind="mismatch",
                      expect=["--init", "vit-1m-32", "--model it was trained as"])
            assert not (tmp_path / "v").exists()


def test_init_refuses_another_input_size(tiny_world, base_ckpt, tmp_path, bad_input):
    other = tmp_path / "ckpt64"
    shutil.copytree(base_ckpt, other)
    cfg = json.loads((other / "open_clip_config.json").read_text())
    cfg["model_cfg"]["vision_cfg"]["image_size"] = 64
    (other / "open_clip_config.json").write_text(json.dumps(cfg))
    bad_input(["train", "--data", tiny_world / "train.csv", "--out", tmp_path / "v", "--init", other, *TINY],
              what="`--init` checkpoint of another input size", kind="mismatch",
              expect=["input size 64 px, not 32 px"])
    bad_input(["train", "--data", tiny_world / "train.csv", "--out", tmp_path / "v", "--init", tmp_path / "nope", *TINY],
              what="`--init` that does not exist", kind="missing input", expect=["does not exist"])


def test_finetune_split_is_disjoint_seeded_and_complete(tiny_world, tmp_path):
    from clip_poison.run import finetune_split

    cfg = {"seed": 3, "finetune": {"init": "scratch", "pretrain_fraction": 0.5}, "train": {}}
    csv, init = finetune_split(cfg, tiny_world, tmp_path / "a")
    assert init is None
    pre, ft = read_csv_dataset(tmp_path / "a" / "pretrain.csv"), read_csv_dataset(csv)
    x = read_csv_dataset(tiny_world / "train.csv")
    assert len(pre) == round(0.5 * len(x)) and len(pre) + len(ft) == len(x)
    assert not set(pre.paths) & set(ft.paths)
    assert sorted(pre.paths + ft.paths) == sorted(x.paths)
    finetune_split(cfg, tiny_world, tmp_path / "b")
    assert (tmp_path / "a" / "finetune.csv").read_bytes() == (tmp_path / "b" / "finetune.csv").read_bytes()
    finetune_split({**cfg, "seed": 4}, tiny_world, tmp_path / "c")
    assert (tmp_path / "a" / "finetune.csv").read_bytes() != (tmp_path / "c" / "finetune.csv").read_bytes()
    # the poisons are crafted from the fine-tune part, never the held-out pretraining part
    assert np.isin(ft.paths, x.paths).all()
