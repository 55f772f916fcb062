"""Attack success rates and their aggregation, against hand-computed small cases (§4.2, §4.3)."""
import math

import pytest

from clip_poison.metrics.asr import backdoor_asr, targeted_asr_over_runs, targeted_success


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
