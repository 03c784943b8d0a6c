"""Quality measures: perplexity over held-out text and greedy agreement, for the float model
(NumPy reference) and for a compiled artifact (the C runtime)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .models.perplexity import WINDOW, perplexity_reference, token_nll, windows  # the reference side

__all__ = ["WINDOW", "greedy_agreement", "perplexity_artifact", "perplexity_reference", "token_nll", "windows"]


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
