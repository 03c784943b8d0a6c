"""Model architectures and checkpoint importers."""
from __future__ import annotations

from pathlib import Path

from .config import Expert, Layer, MoEConfig, MoEModel
from .hf_mixtral import ModelImportError, load_mixtral, read_config

# architectures (as named in an HF config's "architectures" list) → importer
IMPORTERS = {"MixtralForCausalLM": load_mixtral}


def load_model(model_dir: str | Path) -> MoEModel:
    """Import a checkpoint directory into the project's MoEModel, by its declared architecture."""
    hf = read_config(Path(model_dir))
    archs = hf.get("architectures") or []
    for a in archs:
        if a in IMPORTERS:
            return IMPORTERS[a](Path(model_dir))
    raise ModelImportError(
        f"unknown architecture {archs or hf.get('model_type')!r} in {model_dir}/config.json; "
        f"supported: {', '.join(sorted(IMPORTERS))}"
    )


__all__ = ["Expert", "Layer", "MoEConfig", "MoEModel", "ModelImportError", "load_model", "IMPORTERS"]
