"""Zero-shot classification with the prompt ensemble (§2.2 "zero-shot classifiers", §4.2)."""
from __future__ import annotations

import numpy as np
import torch
from open_clip import build_zero_shot_classifier


def zero_shot_weights(model, tokenizer, classnames: list[str], templates: list[str]) -> np.ndarray:
    """d x C class embeddings: each the normalised mean of its prompts' text embeddings (open_clip's
    own ``build_zero_shot_classifier``). Templates use CLIP_benchmark's ``{c}`` placeholder."""
    fns = [lambda c, t=t: t.format(c=c) for t in templates]
    device = next(model.parameters()).device
    w = build_zero_shot_classifier(model, tokenizer, classnames, fns, device=device)
    return w.float().cpu().numpy()


def zero_shot_predict(image_emb: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return np.argmax(image_emb @ weights, axis=1)


def zero_shot_accuracy(preds: np.ndarray, labels: np.ndarray) -> dict:
    """Top-1 accuracy of zero-shot predictions over the eval set."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    return {"accuracy": float(np.mean(preds == labels)), "n": int(len(labels))}


__all__ = ["zero_shot_weights", "zero_shot_predict", "zero_shot_accuracy"]
