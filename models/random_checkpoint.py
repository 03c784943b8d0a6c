"""Real-size MoE checkpoints with random weights, written tensor by tensor, for measuring the compiler
and runtime on the shapes people deploy without downloading a model.

The model is instantiated on PyTorch's meta device (names and shapes, no memory), then each tensor is
drawn (normal, the config's initializer_range; norms one, biases zero) and written into safetensors
shards of about 2 GiB, so peak memory is one shard whatever the model's size: OLMoE-1B-7B's 6.9 B
parameters (13.8 GB in bfloat16) are written in a few hundred MiB of RAM. The tokenizer is the bundled
model's (4096 tokens; the embedding keeps the shape's full vocabulary), so --calibration works on it.

    python -m edgemoe.models.random_checkpoint OUT --shape olmoe-1b-7b
    python -m edgemoe.models.random_checkpoint OUT --shape mixtral-8x7b --layers 4
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

BUNDLED = Path(__file__).resolve().parent / "zoo" / "mixtral-mini"
SHARD_BYTES = 2 << 30

# Published shapes (each model's config.json on the Hugging Face hub).
SHAPES = {
    "olmoe-1b-7b": ("OlmoeConfig", "OlmoeForCausalLM", dict(
        vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
        num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
        max_position_embeddings=4096, rope_theta=10000.0, norm_topk_prob=False, tie_word_embeddings=False)),
    "mixtral-8x7b": ("MixtralConfig", "MixtralForCausalLM", dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=False)),
    "qwen3-30b-a3b": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
        num_experts_per_tok=8, max_position_embeddings=40960, rope_theta=1e6, norm_topk_prob=True,
        tie_word_embeddings=False, decoder_sparse_step=1, mlp_only_layers=[])),
}


def _initial_value(name: str, shape: tuple, std: float, generator, dtype):
    import torch

    if len(shape) == 1 and "norm" in name:
        return torch.ones(shape, dtype=dtype)
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=dtype)
    return torch.empty(shape, dtype=dtype).normal_(0.0, std, generator=generator)


def write(out: str | Path, shape: str, layers: int | None = None, dtype: str = "bfloat16", seed: int = 0,
          **overrides) -> int:
    """Writes the checkpoint into `out` (config.json, safetensors shards with their index, the bundled
    tokenizer); returns its parameter count. `layers` and `overrides` change the published shape."""
    import torch
    import transformers
    from safetensors.torch import save_file
    from transformers.core_model_loading import revert_weight_conversion

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}: one of {', '.join(SHAPES)}")
    config_class, model_class, fields = SHAPES[shape]
    fields = dict(fields, **overrides, bos_token_id=1, eos_token_id=2)
    if layers is not None:
        fields["num_hidden_layers"] = layers
    cfg = getattr(transformers, config_class)(**fields)
    cfg.dtype = dtype
    cfg.architectures = [model_class]
    with torch.device("meta"):
        model = getattr(transformers, model_class)(cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # The names and shapes as save_pretrained writes them (per-expert tensors, not transformers' fused
    # in-memory ones): its own reverse conversion, applied to shape-only tensors.
    tensors = [(n, tuple(p.shape)) for n, p in revert_weight_conversion(model, model.state_dict()).items()]
    del model
    torch_dtype = getattr(torch, dtype)
    width = torch.empty((), dtype=torch_dtype).element_size()
    generator = torch.Generator().manual_seed(seed)
    shard_names: list[list[str]] = []  # tensor names per shard written
    shard, shard_bytes, total = {}, 0, 0

    def flush():
        # Provisional names: the shard count is known only at the end.
        save_file(shard, str(out / f"shard-{len(shard_names) + 1:05d}.safetensors"), metadata={"format": "pt"})
        shard_names.append(list(shard))

    for name, dims in tensors:
        shard[name] = _initial_value(name, dims, cfg.initializer_range, generator, torch_dtype)
        shard_bytes += shard[name].numel() * width
        total += shard[name].numel()
        if shard_bytes >= SHARD_BYTES:
            flush()
            shard, shard_bytes = {}, 0
    if shard:
        flush()
    count, weight_map = len(shard_names), {}
    for i, names in enumerate(shard_names):
        final = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
        (out / f"shard-{i + 1:05d}.safetensors").rename(out / final)
        weight_map.update(dict.fromkeys(names, final))
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total * width}, "weight_map": weight_map}, indent=1))
    cfg.to_json_file(out / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(BUNDLED / name, out / name)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="olmoe-1b-7b")
    ap.add_argument("--layers", type=int, help="decoder layers [the published shape's]")
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="bfloat16")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    n = write(a.out, a.shape, a.layers, a.dtype, a.seed)
    print(f"{a.out}: {a.shape}, {n / 1e9:.2f} B parameters, {a.dtype}")


if __name__ == "__main__":
    main()
