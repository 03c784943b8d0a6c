"""The reference of a compiled artifact: the float model with what the artifact stores in place of
its weights, for the NumPy reference executor to compute what the runtime must."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from ..models import Expert
from .expert_image import read_experts
from .llamacpp_rounding import llamacpp_rounded
from .quantize import compiled_trunk


def artifact_model(model, artifact_dir):
    """The float model with what an artifact stores in place of its weights: the experts as read
    back from its experts.bin, the trunk quantized as its manifest records, its KV cache's element
    type. The reference for that artifact's runtime."""
    manifest = json.loads((Path(artifact_dir) / "manifest.json").read_text())
    q = manifest["quantization"]
    if q.get("rule") == "llamacpp":
        model = llamacpp_rounded(model, q["bit_plan"], q["trunk_bits"], q["group"])
    ref = compiled_trunk(model, q["trunk_bits"], q["group"], q["layout"], q["int4_grid"])
    stored = read_experts(Path(artifact_dir) / "experts.bin")
    layers = list(ref.layers)
    for li, row in zip(ref.config.moe_layer_ids, stored):
        layers[li] = replace(layers[li], experts=[Expert(*(None if m is None else m.dequantize()
                                                           for m in (w.gate, w.up, w.down))) for w in row])
    return replace(ref, layers=layers, kv_cache=manifest.get("kv_cache", "float32"))
