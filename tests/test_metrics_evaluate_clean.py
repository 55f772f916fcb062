"""A clean model's backdoor ASR is its base rate of calling non-target images y' (§4.3).

A model that never saw the trigger has no reason to answer y' for triggered images, so its ASR
must sit near the rate at which it calls *clean* non-target images y'. The eval set is built so
the two common mistakes give clearly different numbers: half of it is the target class (so a
denominator that keeps the target class is pulled towards the model's accuracy on y'), and the
model's accuracy on the other classes differs from its base rate of y' (so scoring triggered
images against their true labels gives accuracy, not ASR). The test checks both gaps exist
before relying on them, so it cannot pass vacuously.
"""
import numpy as np
import pytest

from clip_poison.attacks.triggers import get_trigger
from clip_poison.config import TrainConfig, WorldConfig
from clip_poison.data.evalsets import EvalSet
from clip_poison.metrics.embed import embed_images
from clip_poison.metrics.evaluate import evaluate_checkpoint
from clip_poison.metrics.zeroshot import zero_shot_predict, zero_shot_weights
from clip_poison.victims.export import load_victim
from clip_poison.victims.train import train_victim
from clip_poison.data.world import EVAL_TEMPLATES, class_names, render_images, write_world

BAND = 0.10  # |ASR − base rate| allowed for a clean model (the trigger is still a pixel change)
TARGET = "tent"


@pytest.mark.slow
def test_clean_model_backdoor_asr_is_near_its_base_rate(tmp_path):
    wcfg = WorldConfig(seed=2, n_train=4000, n_eval=10)
    write_world(wcfg, tmp_path / "w")
    train_victim(tmp_path / "w" / "train.csv", [],
                 TrainConfig(model="rn-tiny-32", epochs=4, batch_size=128, warmup=10), tmp_path / "v")
    names = class_names()
    t = names.index(TARGET)
    labels = np.array([t] * 200 + [c for c in range(10) if c != t] * 25, dtype=np.int64)
    images = list(render_images(labels, wcfg, "clean-asr-test"))
    ev = EvalSet(images, labels, names, list(EVAL_TEMPLATES), [f"k{i}" for i in range(len(labels))],
                 source=str(tmp_path / "mem"), split="clean-asr")
    manifest = {"attack": "backdoor", "target": {"label": TARGET},
                "trigger": {"name": "checkerboard", "patch_size": 4}}
    r = evaluate_checkpoint(tmp_path / "v", ev, [manifest], cache_dir=False)
    bd = r["backdoor"][0]["consistent"]

    # Recompute the ingredients independently of evaluate_checkpoint.
    model, pre, tok = load_victim(tmp_path / "v")
    w = zero_shot_weights(model, tok, names, list(EVAL_TEMPLATES))
    clean_pred = zero_shot_predict(embed_images(model, pre, images), w)
    trig_pred = zero_shot_predict(embed_images(model, pre, images, get_trigger("checkerboard", 4, 32),
                                               [(0, 0)] * len(images)), w)
    other = labels != t
    base = float(np.mean(clean_pred[other] == t))
    wrong_with_target = float(np.mean(trig_pred == t))
    wrong_true_labels = float(np.mean(trig_pred[other] == labels[other]))

    # Scoring against true labels must land outside the band (so that mistake would fail here).
    # Keeping the target class in the denominator is caught exactly by the counts below: a weak
    # tiny model's rate on y' images need not differ from its base rate, so no band check for it.
    del wrong_with_target
    assert abs(wrong_true_labels - base) > BAND, (wrong_true_labels, base, "accuracy too close to base rate")
    assert bd["n"] == int(other.sum()) == 225 and bd["n_excluded_target_class"] == 200
    assert bd["asr"] == pytest.approx(float(np.mean(trig_pred[other] == t)))
    assert abs(bd["asr"] - base) <= BAND, (bd["asr"], base)
    assert abs(r["backdoor"][0]["random"]["asr"] - base) <= BAND, (r["backdoor"][0]["random"]["asr"], base)
