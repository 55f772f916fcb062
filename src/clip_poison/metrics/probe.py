"""Linear probe on frozen image embeddings (§4.2).

The paper's second downstream task: "training a linear probe classifier using the embeddings of
50,000 random ImageNet training images". Here: standardised features, multinomial logistic
regression (scikit-learn, lbfgs); the inverse regularisation strength C is chosen on a seeded,
stratified validation split carved from the training embeddings, then the probe is refit on all
of them with that C (as CLIP's own linear-probe protocol does).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from ..io import rng_for

DEFAULT_C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0)
VAL_FRACTION = 0.2
MAX_ITER = 1000
# Below this many multiply-adds per gradient (N·d·classes) BLAS threads cost more than they save:
# 10k×64, 10 classes fits in 0.06 s single-threaded and 4 s with 2 threads on a shared 2-core box.
SINGLE_THREAD_FLOPS = 1e8


@dataclass
class LinearProbe:
    """A fitted probe: ``model`` (scaler + logistic regression), the chosen ``C``, its validation
    accuracy (NaN when the training set was too small to carve a validation split), and the
    validation accuracy of every C tried."""

    model: Pipeline
    C: float
    val_accuracy: float
    n_train: int
    val_scores: dict[float, float] = field(default_factory=dict)

    def predict(self, emb: np.ndarray) -> np.ndarray:
        return self.model.predict(_as_features(emb, "emb", self.model.n_features_in_))


def _as_features(emb, name: str, d: int | None = None) -> np.ndarray:
    x = np.asarray(emb, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"{name} must be an (N, d) array of embeddings, got shape {x.shape}")
    if d is not None and x.shape[1] != d:
        raise ValueError(f"{name} has {x.shape[1]} features but the probe was fit on {d}; "
                         "embed with the same model as the probe's training embeddings")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} holds non-finite values; check the embedding step")
    return x


def _new_model(c: float, seed: int) -> Pipeline:
    # Standardising first keeps lbfgs well conditioned, so it converges in tens of iterations.
    return make_pipeline(StandardScaler(),
                         LogisticRegression(C=c, max_iter=MAX_ITER, random_state=seed))


def _fit(x: np.ndarray, y: np.ndarray, c: float, seed: int) -> Pipeline:
    small = x.size * len(np.unique(y)) < SINGLE_THREAD_FLOPS
    with warnings.catch_warnings(), threadpool_limits(1 if small else None, user_api="blas"):
        # Separable data never converges at large C; the boundary is already right, so stay quiet.
        warnings.simplefilter("ignore", ConvergenceWarning)
        return _new_model(c, seed).fit(x, y)


def _validation_split(y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split: VAL_FRACTION of each class held out, at least one example of every class
    kept for training (so classes with a single example do not break the split)."""
    rng = rng_for(seed, "probe/validation-split")
    val = []
    for cls in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == cls))
        val.extend(idx[:min(int(round(VAL_FRACTION * len(idx))), len(idx) - 1)].tolist())
    is_val = np.zeros(len(y), dtype=bool)
    is_val[val] = True
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def fit_linear_probe(train_emb: np.ndarray, train_labels, seed: int = 0,
                     c_grid: tuple[float, ...] = DEFAULT_C_GRID) -> LinearProbe:
    """§4.2 linear probe: pick C from ``c_grid`` by accuracy on a seeded validation split of the
    training embeddings (ties go to the smaller C, i.e. stronger regularisation), then refit on all
    training embeddings. Fits in memory (one (N, d) float64 array)."""
    x = _as_features(train_emb, "train_emb")
    y = np.asarray(train_labels)
    if y.shape != (len(x),):
        raise ValueError(f"train_labels must be 1-D with one label per embedding: got shape {y.shape} "
                         f"for {len(x)} embeddings")
    classes = np.unique(y)
    if len(classes) < 2:
        raise ValueError(f"a linear probe needs at least 2 classes in train_labels, got {classes.tolist()}")
    grid = sorted({float(c) for c in c_grid})
    if not grid or grid[0] <= 0:
        raise ValueError(f"c_grid={tuple(c_grid)} must hold at least one positive C, e.g. (0.1, 1.0, 10.0)")

    tr, va = _validation_split(y, seed)
    scores: dict[float, float] = {}
    if len(grid) > 1 and len(va) > 0 and len(np.unique(y[tr])) >= 2:
        for c in grid:
            scores[c] = float(np.mean(_fit(x[tr], y[tr], c, seed).predict(x[va]) == y[va]))
        best = max(grid, key=lambda c: (scores[c], -c))
        val_acc = scores[best]
    else:
        # One C to try, or too few examples to hold any out: nothing to select, nothing validated.
        best, val_acc = grid[len(grid) // 2], float("nan")
    return LinearProbe(model=_fit(x, y, best, seed), C=best, val_accuracy=val_acc,
                       n_train=int(len(x)), val_scores=scores)


def evaluate_linear_probe(probe: LinearProbe, emb: np.ndarray, labels) -> dict:
    """Top-1 accuracy of the probe on labelled embeddings: ``{"accuracy", "n", "C", "val_accuracy"}``."""
    y = np.asarray(labels)
    pred = probe.predict(emb)
    if y.shape != pred.shape:
        raise ValueError(f"labels must be 1-D with one label per embedding: got shape {y.shape} "
                         f"for {len(pred)} embeddings")
    return {"accuracy": float(np.mean(pred == y)), "n": int(len(y)), "C": float(probe.C),
            "val_accuracy": float(probe.val_accuracy)}
