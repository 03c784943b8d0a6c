"""Tiny random checkpoints of every supported family, built and saved by `transformers` (the
numerical ground truth); shapes chosen to fit both weight layouts (rows multiples of 16, the
quantization group dividing every input width)."""
from __future__ import annotations

from pathlib import Path

COMMON = dict(vocab_size=160, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, tie_word_embeddings=False, rms_norm_eps=1e-6)

FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(intermediate_size=96, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(moe_intermediate_size=64, shared_expert_intermediate_size=96, num_experts=8,
                       num_experts_per_tok=2, intermediate_size=128)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(head_dim=32, moe_intermediate_size=64, num_experts=16, num_experts_per_tok=4,
                       norm_topk_prob=True, intermediate_size=128)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(intermediate_size=64, num_experts=8, num_experts_per_tok=2)),
    # tied embeddings, as Granite ships them: the embedding and logit multipliers cannot be folded; with
    # attention biases, so that the folds into the q and output projections cover theirs
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM",
                   dict(intermediate_size=64, num_local_experts=8, num_experts_per_tok=2, tie_word_embeddings=True,
                        attention_bias=True,
                        embedding_multiplier=2.5, attention_multiplier=0.3, residual_multiplier=0.7,
                        logits_scaling=3.0)),
    # Granite with a shared MLP, untied this time
    "granitemoeshared": ("GraniteMoeSharedConfig", "GraniteMoeSharedForCausalLM",
                         dict(intermediate_size=64, num_local_experts=8, num_experts_per_tok=2,
                              shared_intermediate_size=32, embedding_multiplier=1.5, attention_multiplier=0.2,
                              residual_multiplier=0.5, logits_scaling=2.0)),
    # per-head q/k norm with DeepSeek-V3 routing (biased sigmoid, groups), a dense first layer and a shared expert
    "dots1": ("Dots1Config", "Dots1ForCausalLM",
              dict(num_hidden_layers=3, head_dim=16, intermediate_size=96, moe_intermediate_size=32,
                   n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, n_shared_experts=1,
                   first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.5)),
    # LayerNorm, attention and LM head biases, sparsemixer routing; router_jitter_noise 0.5 (a relative
    # margin of 1) so that with this model's small router logits each pick's softmax sometimes holds
    # one expert and sometimes more (at Phi-3.5's 0.01 the first pick's weight would always be 1)
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM",
               dict(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, attention_bias=True,
                    lm_head_bias=True, router_jitter_noise=0.5)),
    # multi-head latent attention (MLA expands keys and values for every head: kv heads = heads), the first
    # layer dense, one shared expert; V2-Lite's plain q projection and grouped softmax routing, V3's q
    # bottleneck, sigmoid routing with a correction bias within 2 of 4 groups and a routed scaling factor
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM",
                    dict(num_hidden_layers=3, num_key_value_heads=4, first_k_dense_replace=1, intermediate_size=96,
                         moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                         topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=1.5,
                         kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=16, qk_nope_head_dim=16,
                         v_head_dim=16)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(num_hidden_layers=3, num_key_value_heads=4, first_k_dense_replace=1, intermediate_size=96,
                         moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                         n_group=4, topk_group=2, routed_scaling_factor=2.5, kv_lora_rank=32, q_lora_rank=32,
                         qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16)),
    # attention sinks, a sliding layer (window 4, shorter than the test sequences) then a full one,
    # yarn RoPE (GptOssConfig's default), router and expert biases; swiglu_limit 0.2 so that the
    # clamps act on this model's small gate and up outputs (at 7.0 they never would)
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(head_dim=16, intermediate_size=64, num_local_experts=8, num_experts_per_tok=2, sliding_window=4,
                     layer_types=["sliding_attention", "full_attention"], swiglu_limit=0.2)),
}


def hf_model(family: str, seed: int = 1234, **changes):
    """The family's tiny model, with `changes` to its config."""
    import torch
    import transformers

    config_cls, model_cls, extra = FAMILIES[family]
    cfg = getattr(transformers, config_cls)(**{**COMMON, **extra, **changes})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg)
    with torch.no_grad():  # random biases and norm weights, so that a skipped one shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or name.endswith("sinks"):
                p.add_(0.1 * torch.randn_like(p))
        for name, b in model.named_buffers():  # DeepSeek-V3's router correction bias, zero at initialisation
            if name.endswith("e_score_correction_bias"):
                b.add_(0.1 * torch.randn_like(b))
    return model.eval()


def save_checkpoint(family: str, out: Path, **changes) -> Path:
    hf_model(family, **changes).save_pretrained(out)
    return out


def hf_logits(model_dir: Path, tokens: list[int]):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


# Switch Transformers (encoder-decoder, tests/test_switch.py): the encoder's second block sparse
# (sparse step 2), both decoder blocks sparse (step 1); distances beyond relative_attention_max_distance
# within the tests' inputs, so that the last bucket is reached
SWITCH = dict(vocab_size=160, d_model=64, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
              num_experts=4, num_sparse_encoder_layers=1, num_sparse_decoder_layers=2,
              relative_attention_num_buckets=16, relative_attention_max_distance=24)
# For greedy decoding through the runtime: an LM head of its own (transformers initialises it at std 1,
# and without tied embeddings the decoder output is not scaled by d_model^-0.5), so that the greedy
# tokens vary with the input (the tied tiny model repeats its first pick whatever the input)
SWITCH_VARIED = dict(tie_word_embeddings=False)


def switch_model(seed: int = 1234, **changes):
    import torch
    import transformers

    cfg = transformers.SwitchTransformersConfig(**{**SWITCH, **changes})
    torch.manual_seed(seed)
    model = transformers.SwitchTransformersForConditionalGeneration(cfg)
    with torch.no_grad():  # random norm weights, so that a skipped one shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def save_switch_checkpoint(out: Path, **changes) -> Path:
    switch_model(**changes).save_pretrained(out)
    return out


def switch_logits(model_dir: Path, encoder_tokens: list[int], decoder_tokens: list[int]):
    """transformers' decoder logits [len(decoder_tokens), vocab] for the encoder input, teacher-forced."""
    import torch
    import transformers

    model = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(input_ids=torch.tensor([encoder_tokens]),
                     decoder_input_ids=torch.tensor([decoder_tokens])).logits[0].numpy()
