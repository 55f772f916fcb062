"""Linear probe on frozen embeddings (§4.2)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from clip_poison.metrics.probe import evaluate_linear_probe, fit_linear_probe


def _blobs(rng, n_per_class, centers, scale=0.3):
    x = np.concatenate([c + scale * rng.normal(size=(n, len(c))) for c, n in zip(centers, n_per_class)])
    y = np.repeat(np.arange(len(centers)), n_per_class)
    return x, y


def test_hand_case_symmetric_1d_boundary_at_zero():
    # Class 0 at x ∈ {−2, −1}, class 1 at {1, 2}: the data is symmetric about 0, so the fitted
    # boundary is x = 0 (P(class 1 | x=0) = ½). Probe points −3, −0.5 → 0 and 0.5, 3 → 1; against
    # labels [0, 1, 1, 1] that is 3 right of 4: accuracy 0.75.
    x = np.array([[-2.0], [-1.0], [1.0], [2.0]])
    probe = fit_linear_probe(x, [0, 0, 1, 1], seed=0, c_grid=(1.0,))
    assert probe.model.predict_proba([[0.0]])[0, 1] == pytest.approx(0.5, abs=1e-3)
    test = np.array([[-3.0], [-0.5], [0.5], [3.0]])
    assert probe.predict(test).tolist() == [0, 0, 1, 1]
    r = evaluate_linear_probe(probe, test, [0, 1, 1, 1])
    assert r["accuracy"] == 0.75 and r["n"] == 4 and r["C"] == 1.0


def test_two_examples_per_class_leave_nothing_to_validate():
    # 20% of 2 rounds to 0 held out per class: no validation split, so no accuracy to report.
    x = np.array([[-2.0], [-1.0], [1.0], [2.0]])
    probe = fit_linear_probe(x, [0, 0, 1, 1], c_grid=(0.1, 1.0, 10.0))
    assert math.isnan(probe.val_accuracy) and probe.val_scores == {}
    assert probe.C == 1.0  # the middle of the sorted grid


def test_separable_toy_set_is_classified_perfectly():
    rng = np.random.default_rng(0)
    centers = [np.eye(8)[k] * 4 for k in range(3)]
    x, y = _blobs(rng, [50, 50, 50], centers)
    xt, yt = _blobs(rng, [20, 20, 20], centers)
    probe = fit_linear_probe(x, y, seed=0)
    assert probe.val_accuracy == 1.0
    assert evaluate_linear_probe(probe, xt, yt)["accuracy"] == 1.0


@pytest.mark.parametrize("grid", [(1e-6, 1.0), (1.0, 1e-6)])
def test_c_is_chosen_by_validation_accuracy(grid):
    # At C=1e-6 the weights are ~0 and the probe predicts the majority class (60%); at C=1 it
    # separates the blobs. Selection must pick C=1 whatever the grid's order.
    rng = np.random.default_rng(1)
    x, y = _blobs(rng, [60, 40], [np.array([2.0, 0, 0, 0]), np.array([-2.0, 0, 0, 0])])
    probe = fit_linear_probe(x, y, seed=3, c_grid=grid)
    assert probe.C == 1.0
    assert probe.val_scores[1.0] == 1.0
    assert probe.val_scores[1e-6] == pytest.approx(0.6)  # 12 of the 20 held out are class 0


def test_refit_uses_all_training_embeddings():
    rng = np.random.default_rng(2)
    x, y = _blobs(rng, [30, 30], [np.array([1.0, 1.0]), np.array([-1.0, -1.0])])
    probe = fit_linear_probe(x, y, seed=0)
    # The scaler's mean is the mean of whatever the final model was fit on.
    np.testing.assert_allclose(probe.model[0].mean_, x.mean(axis=0), atol=1e-12)
    assert probe.n_train == 60


def test_same_seed_same_probe():
    rng = np.random.default_rng(4)
    x, y = _blobs(rng, [40, 40, 40], [np.zeros(6), np.full(6, 0.4), np.full(6, -0.4)], scale=0.5)
    a, b = fit_linear_probe(x, y, seed=5), fit_linear_probe(x, y, seed=5)
    assert (a.C, a.val_accuracy, a.val_scores) == (b.C, b.val_accuracy, b.val_scores)
    np.testing.assert_array_equal(a.predict(x), b.predict(x))


def test_a_class_with_one_example_stays_in_training():
    rng = np.random.default_rng(5)
    x, y = _blobs(rng, [30, 30, 1], [np.array([3.0, 0]), np.array([-3.0, 0]), np.array([0, 9.0])])
    probe = fit_linear_probe(x, y, seed=0, c_grid=(10.0,))
    assert probe.predict([[0.0, 9.0]]).tolist() == [2]


def test_result_is_plain_json():
    rng = np.random.default_rng(6)
    x, y = _blobs(rng, [20, 20], [np.array([1.0, 0]), np.array([-1.0, 0])])
    r = evaluate_linear_probe(fit_linear_probe(x, y), x, y)
    assert set(r) == {"accuracy", "n", "C", "val_accuracy"}
    assert all(type(v) in (float, int) for v in r.values())
    json.dumps(r)


def test_errors_name_the_problem():
    x = np.zeros((4, 3))
    with pytest.raises(ValueError, match="at least 2 classes"):
        fit_linear_probe(x, [1, 1, 1, 1])
    with pytest.raises(ValueError, match="one label per embedding"):
        fit_linear_probe(x, [0, 1, 0])
    with pytest.raises(ValueError, match="positive C"):
        fit_linear_probe(x, [0, 1, 0, 1], c_grid=(0.0,))
    probe = fit_linear_probe(np.eye(4)[:, :3], [0, 1, 0, 1], c_grid=(1.0,))
    with pytest.raises(ValueError, match="probe was fit on 3"):
        probe.predict(np.zeros((2, 5)))
