"""Writes a Mixtral-shaped checkpoint with random weights (transformers' own initialisation) for
measuring the compiler on real-size shapes without downloading a model. The tokenizer is the
bundled model's, so the vocabulary is its 4096 tokens and --calibration works on the result.

    python scripts/random_checkpoint.py /tmp/mixtral-rand --layers 4 --hidden 1024 --intermediate 1024 \
        --experts 32 --top-k 8 --dtype bfloat16
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from transformers import MixtralConfig, MixtralForCausalLM

BUNDLED = Path(__file__).resolve().parent.parent / "models" / "zoo" / "mixtral-mini"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="bfloat16")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    cfg = MixtralConfig(vocab_size=4096, hidden_size=a.hidden, intermediate_size=a.intermediate,
                        num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                        num_local_experts=a.experts, num_experts_per_tok=a.top_k, max_position_embeddings=4096,
                        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    model = MixtralForCausalLM(cfg).to(getattr(torch, a.dtype)).eval()
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(a.out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(BUNDLED / name, a.out / name)
    print(f"{a.out}: {n / 1e6:.1f}M parameters, {a.dtype}")


if __name__ == "__main__":
    main()
