"""Model architectures and checkpoint importers: one folder per family under families/."""
from __future__ import annotations

from dataclasses import fields, is_dataclass, replace
from pathlib import Path

from .config import Expert, Layer, MoEConfig, MoEModel
from .families import family_modules
from .gguf_import import gguf_file
from .hf_import import ModelImportError, read_config
from .onnx_import import onnx_file
from .stored_tensor import LazyTensor

# architectures (as named in an HF config's "architectures" list) → family module (describe, load)
IMPORTERS = {arch: fam for fam in family_modules() for arch in fam.ARCHITECTURES}


def load_model(model_dir: str | Path, lazy_experts: bool = False, lazy: bool = False) -> MoEModel:
    """Import a checkpoint into the project's MoEModel, by its declared architecture: a Hugging Face
    directory (config.json + *.safetensors), or a GGUF file (a path ending in .gguf, or a directory
    holding one .gguf and no config.json; gguf_import.py), or a torch.onnx export (a path ending in
    .onnx, or a directory holding one .onnx and no safetensors, config.json beside it; onnx_import.py).
    Every weight is a float32 array, except with `lazy_experts`, where the expert matrices of an HF
    checkpoint, a GGUF or an ONNX export's external data stay in the file (StoredTensor, GGUFTensor),
    read when used (one expert at a time: the streaming compile); with `lazy`, every tensor the file
    holds as it is used stays stored (the trunk too: the streaming compile of a model whose trunk
    alone is gigabytes)."""
    onnx = onnx_file(model_dir)
    if onnx is not None:
        from .onnx_import import load_onnx

        model = load_onnx(onnx)
        return model if lazy else read_stored(model, lazy_experts)
    gguf = gguf_file(model_dir)
    if gguf is not None:
        from .gguf_import import load_gguf

        model = load_gguf(gguf)
        return model if lazy else read_stored(model, lazy_experts)
    hf = read_config(Path(model_dir))
    archs = hf.get("architectures") or []
    for a in archs:
        if a in IMPORTERS:
            model = IMPORTERS[a].load(Path(model_dir))
            return model if lazy else read_stored(model, lazy_experts)
    raise ModelImportError(
        f"unknown architecture {archs or hf.get('model_type')!r} in {model_dir}/config.json; "
        f"supported: {', '.join(sorted(IMPORTERS))}"
    )


def read_stored(obj, lazy_experts: bool = False, _read: dict | None = None):
    """`obj` (a model, layer, expert or list of them) with every LazyTensor read into an array, each
    once (tied embeddings stay one array); with `lazy_experts`, routed experts' weights are left
    stored."""
    read = {} if _read is None else _read
    if isinstance(obj, LazyTensor):
        if id(obj) not in read:
            read[id(obj)] = obj.read()
        return read[id(obj)]
    if isinstance(obj, list):
        return [read_stored(x, lazy_experts, read) for x in obj]
    if is_dataclass(obj) and not isinstance(obj, (type, MoEConfig)):
        return replace(obj, **{f.name: read_stored(getattr(obj, f.name), lazy_experts, read) for f in fields(obj)
                               if f.init and not (lazy_experts and f.name == "experts")})
    return obj


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
    table, or the config.json beside an ONNX export (no tensors read)."""
    onnx = onnx_file(model_dir)
    if onnx is not None:
        from .onnx_import import describe_onnx

        return describe_onnx(onnx)
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


__all__ = ["Expert", "Layer", "MoEConfig", "MoEModel", "ModelImportError", "load_model", "read_stored", "describe_model",
           "reference_executor", "IMPORTERS"]
