"""Model architectures and checkpoint importers: one folder per family under families/."""
from __future__ import annotations

from pathlib import Path

from .config import Expert, Layer, MoEConfig, MoEModel
from .families import family_modules
from .gguf_import import gguf_file
from .hf_import import ModelImportError, read_config

# architectures (as named in an HF config's "architectures" list) → family module (describe, load)
IMPORTERS = {arch: fam for fam in family_modules() for arch in fam.ARCHITECTURES}


def load_model(model_dir: str | Path) -> MoEModel:
    """Import a checkpoint into the project's MoEModel, by its declared architecture: a Hugging Face
    directory (config.json + *.safetensors), or a GGUF file (a path ending in .gguf, or a directory
    holding one .gguf and no config.json; gguf_import.py)."""
    gguf = gguf_file(model_dir)
    if gguf is not None:
        from .gguf_import import load_gguf

        return load_gguf(gguf)
    hf = read_config(Path(model_dir))
    archs = hf.get("architectures") or []
    for a in archs:
        if a in IMPORTERS:
            return IMPORTERS[a].load(Path(model_dir))
    raise ModelImportError(
        f"unknown architecture {archs or hf.get('model_type')!r} in {model_dir}/config.json; "
        f"supported: {', '.join(sorted(IMPORTERS))}"
    )


def reference_executor(model: MoEModel, max_positions: int | None = None):
    """The NumPy reference executor of a model: ReferenceExecutor (decoder-only) or
    EncoderDecoderExecutor; both give greedy(prompt, n_new) as the runtime's em_prefill and
    em_decode_step compute it."""
    from .encoder_decoder import EncoderDecoderExecutor
    from .reference import ReferenceExecutor

    executor = EncoderDecoderExecutor if model.config.encoder_layers else ReferenceExecutor
    return executor(model, max_positions)


def describe_model(model_dir: str | Path) -> MoEConfig:
    """The MoEConfig of a checkpoint from its config.json alone, or a GGUF's metadata and tensor
    table (no tensors read)."""
    gguf = gguf_file(model_dir)
    if gguf is not None:
        from .gguf_import import describe_gguf

        return describe_gguf(gguf)
    hf = read_config(Path(model_dir))
    for a in hf.get("architectures") or []:
        if a in IMPORTERS:
            return IMPORTERS[a].describe(hf, Path(model_dir))
    raise ModelImportError(f"unknown architecture {hf.get('architectures')!r} in {model_dir}/config.json; "
                           f"supported: {', '.join(sorted(IMPORTERS))}")


__all__ = ["Expert", "Layer", "MoEConfig", "MoEModel", "ModelImportError", "load_model", "describe_model",
           "reference_executor", "IMPORTERS"]
