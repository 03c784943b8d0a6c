"""Perplexity of a MoEModel with the batched NumPy reference (the compiler's bit-plan search and
the evaluation CLI both score with it)."""
from __future__ import annotations

import math

import numpy as np

WINDOW = 256  # tokens per non-overlapping scoring window


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of each target under each row of logits."""
    m = logits.max(axis=-1, keepdims=True)
    logz = np.log(np.exp(logits - m).sum(axis=-1)) + m[:, 0]
    return logz - logits[np.arange(len(targets)), targets]


def windows(tokens: list[int] | np.ndarray, window: int) -> list[np.ndarray]:
    """Non-overlapping windows; each predicts its tokens 1..n-1 from the ones before."""
    t = np.asarray(tokens, dtype=np.int64)
    return [t[i : i + window] for i in range(0, len(t) - 1, window) if len(t[i : i + window]) > 1]


def perplexity_reference(model, tokens, window: int = WINDOW, progress=None) -> dict:
    """Perplexity of a MoEModel (float or with dequantized experts) with the batched NumPy reference."""
    from .reference import forward_sequence

    total, count = 0.0, 0
    for w in progress(windows(tokens, window)) if progress else windows(tokens, window):
        logits, _ = forward_sequence(model, w)
        total += float(token_nll(logits[:-1], w[1:]).sum())
        count += len(w) - 1
    return {"tokens": count, "nll": total / count, "perplexity": math.exp(total / count)}
