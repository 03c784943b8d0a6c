"""Quality measures: perplexity over held-out text and greedy agreement, for the float model
(NumPy reference) and for a compiled artifact (the C runtime)."""
from __future__ import annotations

import math
from pathlib import Path

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
    from .models.reference import forward_sequence

    total, count = 0.0, 0
    for w in progress(windows(tokens, window)) if progress else windows(tokens, window):
        logits, _ = forward_sequence(model, w)
        total += float(token_nll(logits[:-1], w[1:]).sum())
        count += len(w) - 1
    return {"tokens": count, "nll": total / count, "perplexity": math.exp(total / count)}


def perplexity_artifact(artifact: Path, tokens, window: int = WINDOW, progress=None, **session_kw) -> dict:
    """Perplexity of a compiled artifact, token by token through the C runtime."""
    from .runtime import Session

    total, count = 0.0, 0
    with Session(artifact, max_seq=window, **session_kw) as s:
        for w in progress(windows(tokens, window)) if progress else windows(tokens, window):
            s.reset()
            logits = np.stack([s.decode_step(int(t)) for t in w[:-1]])
            total += float(token_nll(logits, w[1:]).sum())
            count += len(w) - 1
    return {"tokens": count, "nll": total / count, "perplexity": math.exp(total / count)}


def greedy_agreement(reference_tokens: list[int], candidate_tokens: list[int]) -> dict:
    """Free-running agreement: the share of positions equal, and how many tokens agree before the first difference."""
    n = min(len(reference_tokens), len(candidate_tokens))
    same = [a == b for a, b in zip(reference_tokens[:n], candidate_tokens[:n])]
    prefix = next((i for i, s in enumerate(same) if not s), n)
    return {"positions": n, "agreement": sum(same) / max(n, 1), "common_prefix": prefix}
