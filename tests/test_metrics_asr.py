"""Attack success rates and their aggregation, against hand-computed small cases (§4.2, §4.3)."""
import math

import pytest

from clip_poison.metrics.asr import backdoor_asr, targeted_asr_over_runs, targeted_success
from clip_poison.metrics.summary import summarize_runs


def test_backdoor_asr_excludes_target_class_from_denominator():
    # Target 2. True labels: two images of class 2 (excluded), four others.
    labels = [2, 0, 1, 2, 3, 0]
    preds = [2, 2, 1, 2, 2, 0]  # of the 4 non-target images, 2 (idx 1, 4) are called class 2
    r = backdoor_asr(preds, labels, target=2)
    assert r == {"asr": 0.5, "n": 4, "n_excluded_target_class": 2}
    # Counting the target class would give 4/6, and scoring against true labels 5/6: both differ.
    assert r["asr"] != 4 / 6


def test_backdoor_asr_empty_denominator_is_nan():
    r = backdoor_asr([1, 1], [1, 1], target=1)
    assert math.isnan(r["asr"]) and r["n"] == 0


def test_targeted_asr_counts_model_target_pairs():
    # 2 models × 2 targets + a third model with 1 target: 5 pairs, 3 successes -> 0.6.
    runs = [{"model": "a", "eval_index": 5, "label": "tent", "success": True},
            {"model": "a", "eval_index": 9, "label": "tent", "success": False},
            {"model": "b", "eval_index": 5, "label": "tent", "success": True},
            {"model": "b", "eval_index": 9, "label": "tent", "success": True},
            {"model": "c", "eval_index": 7, "label": "apple", "success": False}]
    r = targeted_asr_over_runs(runs)
    assert r["asr"] == pytest.approx(0.6) and r["n"] == 5 and r["n_success"] == 3
    assert r["n_models"] == 3 and r["n_targets"] == 3
    assert targeted_success(4, 4)["success"] and not targeted_success(3, 4)["success"]


def _result(acc, targeted=(), bd=None, probe_acc=None):
    r = {"zeroshot": {"accuracy": acc, "n": 100},
         "targeted": [{"eval_index": i, "label": "tent", "success": s} for i, s in targeted], "backdoor": []}
    if bd is not None:
        r["backdoor"] = [{"label": "tent", "trigger": {"name": "checkerboard", "patch_size": 4},
                          "consistent": {"asr": bd[0], "n": 90, "z": {"z": bd[1]}},
                          "random": {"asr": bd[0] / 2, "n": 90, "z": {"z": bd[1] / 2}}}]
    if probe_acc is not None:
        r["probe"] = {"accuracy": probe_acc}
    return r


def test_summarize_runs_hand_case():
    poisoned = [_result(0.60, [(5, True), (9, True)], (1.0, 3.0)),
                _result(0.62, [(5, False), (9, True)], (0.8, 2.0)),
                _result(0.58, [(5, True)], (0.9, float("nan")))]
    clean = [_result(0.61, [(5, False), (9, True), (11, True)], (0.1, 0.0)),
             _result(0.63, [(5, False), (9, False)], (0.05, 0.1))]
    s = summarize_runs(poisoned, clean)
    t = s["targeted"]
    assert t["poisoned"]["asr"] == pytest.approx(4 / 5) and t["poisoned"]["n"] == 5
    # Clean models on the same x' only (index 11 was never attacked): 1 of 4.
    assert t["clean_same_x_prime"]["asr"] == pytest.approx(1 / 4) and t["clean_same_x_prime"]["n"] == 4
    assert t["per_model_rate"]["mean"] == pytest.approx((1.0 + 0.5 + 1.0) / 3)
    z = s["zeroshot"]
    assert z["poisoned"]["mean"] == pytest.approx(0.60) and z["poisoned"]["n"] == 3
    assert z["clean"]["mean"] == pytest.approx(0.62)
    assert z["poisoned_vs_clean"]["mean_difference"] == pytest.approx(-0.02)
    assert z["poisoned"]["ci_low"] < 0.60 < z["poisoned"]["ci_high"]
    b = s["backdoor"]["tent/checkerboard/4"]["consistent"]
    assert b["poisoned"]["asr"]["mean"] == pytest.approx(0.9)
    assert b["poisoned"]["z"]["mean"] == pytest.approx(2.5) and b["poisoned"]["z"]["n_dropped_nan"] == 1
    assert b["clean"]["asr"]["mean"] == pytest.approx(0.075)
    assert s["backdoor"]["tent/checkerboard/4"]["random"]["poisoned"]["asr"]["mean"] == pytest.approx(0.45)
    assert "probe" not in s


def test_summarize_runs_without_clean_models():
    s = summarize_runs([_result(0.5, [(1, True)], probe_acc=0.7)])
    assert s["zeroshot"]["clean"] is None and s["zeroshot"]["poisoned_vs_clean"] is None
    assert s["targeted"]["clean_same_x_prime"] is None
    assert s["probe"]["poisoned"]["mean"] == 0.7 and s["probe"]["poisoned"]["note"].startswith("n=1")
    with pytest.raises(ValueError):
        summarize_runs([])
