"""Model architectures and checkpoint importers: one folder per family under families/."""
from __future__ import annotations

from pathlib import Path

from .config import Expert, Layer, MoEConfig, MoEModel
from .families import family_modules
from .hf_import import ModelImportError, read_config

# architectures (as named in an HF config's "architectures" list) → family module (describe, load)
IMPORTERS = {arch: fam for fam in family_modules() for arch in fam.ARCHITECTURES}


def load_model(model_dir: str | Path) -> MoEModel:
    """Import a checkpoint directory into the project's MoEModel, by its declared architecture."""
    hf = read_config(Path(model_dir))
    archs = hf.get("architectures") or []
    for a in archs:
        if a in IMPORTERS:
            return IMPORTERS[a].load(Path(model_dir))
    raise ModelImportError(
        f"unknown architecture {archs or hf.get('model_type')!r} in {model_dir}/config.json; "
        f"supported: {', '.join(sorted(IMPORTERS))}"
    )


def describe_model(model_dir: str | Path) -> MoEConfig:
    """The MoEConfig of a checkpoint from its config.json alone (no tensors read)."""
    hf = read_config(Path(model_dir))
    for a in hf.get("architectures") or []:
        if a in IMPORTERS:
            return IMPORTERS[a].describe(hf, Path(model_dir))
    raise ModelImportError(f"unknown architecture {hf.get('architectures')!r} in {model_dir}/config.json; "
                           f"supported: {', '.join(sorted(IMPORTERS))}")


__all__ = ["Expert", "Layer", "MoEConfig", "MoEModel", "ModelImportError", "load_model", "describe_model",
           "IMPORTERS"]
