"""clip-poison's zero-shot accuracy equals CLIP_benchmark's on the same exported checkpoint."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clip_poison.config import TrainConfig
from clip_poison.data.evalsets import load_wds_evalset
from clip_poison.metrics.evaluate import evaluate_checkpoint
from clip_poison.victims.fast import train_victim


@pytest.mark.slow
def test_zero_shot_accuracy_matches_clip_benchmark(tiny_world, tmp_path):
    cfg = TrainConfig(model="rn-tiny-32", epochs=2, batch_size=64, warmup=2, backend="fast")
    train_victim(tiny_world / "train.csv", [], cfg, tmp_path / "v")
    ours = evaluate_checkpoint(tmp_path / "v", load_wds_evalset(tiny_world / "eval"), [])["zeroshot"]["accuracy"]
    cli = Path(sys.executable).parent / "clip_benchmark"
    # --no_amp: CLIP_benchmark's default autocast runs bfloat16 on CPU, which moved 5 of 1,000
    # predictions on the demo checkpoint; in fp32 both agree exactly.
    out = tmp_path / "cb.json"
    subprocess.run([str(cli), "eval", "--model_type", "open_clip", "--model", f"local-dir:{tmp_path / 'v'}",
                    "--pretrained", "none", "--dataset", "wds/world", "--dataset_root", str(tiny_world / "eval"),
                    "--split", "test", "--task", "zeroshot_classification", "--num_workers", "0", "--no_amp",
                    "--output", str(out)], check=True, capture_output=True, cwd=tmp_path,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    theirs = json.loads(out.read_text())["metrics"]["acc1"]
    assert abs(ours - theirs) <= 0.005, (ours, theirs)
