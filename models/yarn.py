"""YaRN RoPE scaling (transformers' rope_type "yarn") as MoEConfig's rope fields: each frequency's
divisor (rope_factors) and the attention factor multiplying cos and sin (rope_scale); GPT-OSS and
DeepSeek-V2/V3 read their yarn parameters through it.

YaRN blends, per frequency i of base^(-2i/d), the original frequency (extrapolation) with it
divided by `factor` (interpolation), by a linear ramp over the dimensions between the correction
bounds of beta_fast and beta_slow rotations within original_max_position_embeddings:

    inv_freq_i = base^(-2i/d) · ((1 - r_i) / factor + r_i),   r_i = 1 - clamp((i - low) / (high - low), 0, 1)

so the divisor of frequency i is 1 / ((1 - r_i) / factor + r_i). The tables are fixed: unlike
LongRoPE, nothing switches with the sequence length.
"""
from __future__ import annotations

import math

from .hf_import import ModelImportError

# the keys of a yarn rope_parameters this module implements (partial_rotary_factor only at 1)
YARN_KEYS = {"rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings", "beta_fast",
             "beta_slow", "truncate", "attention_factor", "mscale", "mscale_all_dim", "partial_rotary_factor"}


def _positive(where: str, key: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ModelImportError(f"{where}: yarn {key} = {value!r} is not supported: it must be a finite number > 0")
    return float(value)


def yarn_mscale(scale: float, m: float = 1.0) -> float:
    """YaRN's magnitude correction for a context `scale` times the original (1 at or below it)."""
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


def yarn_rope(params: dict, head_dim: int, max_positions: int, where: str) -> tuple[tuple[float, ...], float]:
    """(rope_factors [head_dim/2], rope_scale) of a yarn rope_parameters dict; keys it does not
    implement, or values it cannot use, refused by name. `max_positions` stands in for a missing
    factor (max_position_embeddings / original_max_position_embeddings), as transformers does."""
    unknown = sorted(set(params) - YARN_KEYS)
    if unknown:
        raise ModelImportError(f"{where}: rope_parameters key{'s' if len(unknown) > 1 else ''} "
                               f"{', '.join(map(repr, unknown))} not understood (yarn)")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ModelImportError(f"{where}: yarn partial_rotary_factor = {params['partial_rotary_factor']!r} is not "
                               "supported: only 1.0 (every dimension rotated)")
    base = _positive(where, "rope_theta", params.get("rope_theta"))
    original = _positive(where, "original_max_position_embeddings", params.get("original_max_position_embeddings"))
    factor = params.get("factor")
    factor = max_positions / original if factor is None else _positive(where, "factor", factor)
    beta_fast = _positive(where, "beta_fast", params.get("beta_fast") or 32)
    beta_slow = _positive(where, "beta_slow", params.get("beta_slow") or 1)
    truncate = params.get("truncate", True)
    if not isinstance(truncate, bool):
        raise ModelImportError(f"{where}: yarn truncate = {truncate!r} is not supported: it must be true or false")

    attention = params.get("attention_factor")
    if attention is not None:
        attention = _positive(where, "attention_factor", attention)
    elif params.get("mscale") and params.get("mscale_all_dim"):
        attention = yarn_mscale(factor, _positive(where, "mscale", params["mscale"])) / \
            yarn_mscale(factor, _positive(where, "mscale_all_dim", params["mscale_all_dim"]))
    else:
        attention = yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:  # the dimension that turns `rotations` times in `original`
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # as transformers: a ramp of (almost) no width
    factors = []
    for i in range(head_dim // 2):
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        keep = 1.0 - ramp  # the share of the original (extrapolated) frequency
        factors.append(1.0 / ((1.0 - keep) / factor + keep))
    return tuple(factors), float(attention)
