"""Train the model zoo's MoE causal LMs on English text, deterministically: by default the
bundled reference ``mixtral-mini`` (a ~14M-parameter Mixtral, 8 experts, top-2, on CPU);
``--arch olmoe|qwen3_moe`` and the size options give other architectures and shapes, e.g.
many small experts.

Usage (from the repository root)::

    python models/zoo/train_moe.py --out models/zoo/mixtral-mini --max-steps N
    python -m edgemoe.models.zoo.train_moe --out models/zoo/mixtral-mini --max-steps N
    python models/zoo/train_moe.py --arch olmoe --experts 64 --top-k 8 --intermediate 128 \
        --tokenizer-from models/zoo/mixtral-mini --device cuda --minutes 6 --out models/zoo/olmoe-mini
    python models/zoo/train_moe.py --eval-only models/zoo/mixtral-mini

Steps: train a byte-level BPE tokenizer (vocab 4096) on the training split of
:mod:`corpus` (or reuse one with ``--tokenizer-from``), train the ``transformers`` model with
AdamW and a cosine schedule (fixed seeds, 2 threads, fixed batch order; bfloat16 autocast on
CUDA), save it in float16 safetensors with the tokenizer, then reload the saved files in
float32 and evaluate them (held-out and WikiText-2 test perplexity, a unigram baseline,
per-layer expert load, parameter counts) into ``<out>/train_report.json``.

``--max-steps`` fixes the schedule and makes a run reproducible on a given device; without it
the step count is estimated from ``--minutes`` (default 40) after timing the first steps.
``--minutes`` also stops training once that much time has passed.

The corpus needs nothing outside the repository but the python3.11-doc sources in
``--cache-dir``; on a machine without apt, fill it first (``corpus.py --export-cache DIR``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

try:  # run as part of the package (python -m edgemoe.models.zoo.train_moe)
    from . import corpus
except ImportError:  # run as a plain script (python models/zoo/train_moe.py)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import corpus  # type: ignore[no-redef]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
SEQ_LEN = 256
WIKITEXT_TEST_MAX_CHARS = 300_000

MAX_POSITIONS = 1024
ARCHS = {  # --arch: transformers model class
    "mixtral": "MixtralForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}


class Logger:
    def __init__(self, path: Path | None, mode: str = "a"):
        self.fh = open(path, mode, encoding="utf-8") if path else None

    def __call__(self, msg: str) -> None:
        print(msg, flush=True)
        if self.fh:
            self.fh.write(msg + "\n")
            self.fh.flush()


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def set_determinism(seed: int, device: torch.device) -> None:
    torch.set_num_threads(2)
    torch.manual_seed(seed)  # seeds CUDA too
    np.random.seed(seed)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # else cuBLAS is not deterministic
    # a CUDA kernel without a deterministic version warns rather than aborting the (one-shot) GPU run
    torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: dict[str, str], vocab_size: int):
    """Byte-level BPE (GPT-2 style pre-tokenisation) of ``vocab_size`` tokens, trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def pieces():
        for name in corpus.SOURCES:
            yield from corpus.chunks(texts[name])

    tok.train_from_iterator(pieces(), trainer=trainer)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    return tok


def save_tokenizer(tok, out: Path) -> None:
    """tokenizer.json + tokenizer_config.json loadable with ``transformers.AutoTokenizer``."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        model_max_length=MAX_POSITIONS,
    )
    fast.save_pretrained(str(out))


def encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


def token_stream(tok, texts: dict[str, str]) -> np.ndarray:
    """All sources' tokens in ``SOURCES`` order, each source followed by ``</s>``."""
    ids: list[int] = []
    for name in corpus.SOURCES:
        ids.extend(encode(tok, texts[name]))
        ids.append(EOS_ID)
    return np.asarray(ids, dtype=np.int64)


# --------------------------------------------------------------------------- model


def load_tokenizer(model_dir: Path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    return tok


def build_model(args, vocab_size: int):
    """A freshly initialised ``args.arch`` model of the shape the options give."""
    import transformers

    model_cls = getattr(transformers, ARCHS[args.arch])
    cfg = dict(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        num_experts_per_tok=args.top_k,
        max_position_embeddings=MAX_POSITIONS,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        output_router_logits=True,
        router_aux_loss_coef=0.02,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    if args.arch == "mixtral":
        cfg.update(num_local_experts=args.experts, intermediate_size=args.intermediate)
    elif args.arch == "olmoe":
        # OlmoeConfig's default pad id is 1, our <s>: its embedding row would never be trained
        cfg.update(num_experts=args.experts, intermediate_size=args.intermediate, pad_token_id=None)
    else:  # qwen3_moe: every layer sparse, top-k weights renormalised as in the released Qwen3 MoEs
        cfg.update(num_experts=args.experts, moe_intermediate_size=args.intermediate,
                   intermediate_size=args.intermediate, head_dim=args.hidden // args.heads, norm_topk_prob=True)
    config = model_cls.config_class(**cfg)
    config._experts_implementation = args.experts_impl
    return model_cls(config)


def param_counts(model) -> dict:
    seen, total, experts, router = set(), 0, 0, 0
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if ".experts." in name:
            experts += p.numel()
        elif ".gate." in name:
            router += p.numel()
    cfg = model.config
    per_expert = experts // (cfg.num_hidden_layers * cfg.num_local_experts)
    inactive = (cfg.num_local_experts - cfg.num_experts_per_tok) * cfg.num_hidden_layers * per_expert
    return {
        "total": total,
        "experts": experts,
        "experts_fraction": round(experts / total, 4),
        "router": router,
        "non_expert": total - experts,
        "per_expert": per_expert,
        "active_per_token": total - inactive,
    }


def lr_at(step: int, max_steps: int, peak: float, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, max_steps - warmup)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


class Batches:
    """Deterministic batches of ``SEQ_LEN + 1``-token windows from one token stream: each epoch
    starts at a seeded random offset, cuts non-overlapping windows and visits them in a seeded
    random order."""

    def __init__(self, stream: np.ndarray, batch_size: int, seed: int):
        self.stream, self.bs = stream, batch_size
        self.rng = np.random.default_rng(seed)
        self.epoch, self.order, self.pos = -1, np.zeros(0, dtype=np.int64), 0

    def _new_epoch(self):
        self.epoch += 1
        off = int(self.rng.integers(0, SEQ_LEN))
        starts = np.arange(off, len(self.stream) - SEQ_LEN - 1, SEQ_LEN, dtype=np.int64)
        self.order, self.pos = self.rng.permutation(starts), 0

    def next(self) -> torch.Tensor:
        if self.pos + self.bs > len(self.order):
            self._new_epoch()
        idx = self.order[self.pos : self.pos + self.bs]
        self.pos += self.bs
        return torch.from_numpy(np.stack([self.stream[s : s + SEQ_LEN + 1] for s in idx]))


def eval_windows(ids: np.ndarray) -> list[np.ndarray]:
    """Non-overlapping windows of ``SEQ_LEN`` tokens (the last one may be shorter, >= 2 tokens)."""
    return [ids[i : i + SEQ_LEN] for i in range(0, len(ids), SEQ_LEN) if len(ids[i : i + SEQ_LEN]) >= 2]


@torch.no_grad()
def window_nll(model, windows: list[np.ndarray], batch_size: int = 16, collect_routing: bool = False):
    """Summed next-token NLL over the windows (each window's first token is context only), the
    number of predicted tokens, and optionally per-layer top-k expert assignment counts."""
    cfg = model.config
    nll, count = 0.0, 0
    load = np.zeros((cfg.num_hidden_layers, cfg.num_local_experts), dtype=np.int64)
    for b in range(0, len(windows), batch_size):
        group = windows[b : b + batch_size]
        for length in sorted({len(w) for w in group}):  # only the last window can be short
            x = torch.from_numpy(np.stack([w for w in group if len(w) == length])).to(model.device)
            out = model(input_ids=x, output_router_logits=collect_routing)
            logp = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)
            nll -= logp.gather(-1, x[:, 1:, None]).sum().item()
            count += x[:, 1:].numel()
            if collect_routing:
                for layer, rl in enumerate(out.router_logits):
                    top = torch.topk(rl.float(), cfg.num_experts_per_tok, dim=-1).indices
                    load[layer] += np.bincount(top.reshape(-1).cpu().numpy(), minlength=cfg.num_local_experts)
    return nll, count, load


# --------------------------------------------------------------------------- training


def per_layer_balance_loss(router_logits, top_k: int) -> torch.Tensor:
    """Switch-style load-balancing loss taken per layer and averaged (1.0 when balanced).

    transformers' ``aux_loss`` (Mixtral, OLMoE, Qwen3-MoE alike) pools the router logits of all
    layers before balancing, which only balances expert *slots* across layers: an expert can die
    in one layer while its namesake in another layer takes up the slack. Expert offloading needs
    every layer's experts used, so each layer is balanced on its own. ``router_logits`` holds each sparse
    layer's raw router logits, (tokens, experts); all three architectures route by softmax
    then top-k, so the same loss fits them."""
    losses = []
    for logits in router_logits:
        probs = torch.softmax(logits.float().reshape(-1, logits.shape[-1]), dim=-1)
        chosen = torch.topk(probs, top_k, dim=-1).indices
        n_experts = probs.shape[-1]
        assigned = torch.nn.functional.one_hot(chosen, n_experts).float().sum(1).mean(0) / top_k
        losses.append(n_experts * (assigned * probs.mean(0)).sum())
    return torch.stack(losses).mean()


def train(args, log: Logger) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = pick_device(args.device)
    set_determinism(args.seed, device)

    t0 = time.time()
    texts = corpus.train_texts(args.data_dir, args.cache_dir)
    heldout = corpus.heldout_texts(args.data_dir, args.cache_dir)
    tok = load_tokenizer(Path(args.tokenizer_from)) if args.tokenizer_from else train_tokenizer(texts, args.vocab)
    save_tokenizer(tok, out)
    (out / "calibration.txt").write_text(corpus.calibration_text(args.data_dir, args.cache_dir), encoding="utf-8")
    (out / "search.txt").write_text(corpus.search_text(args.data_dir, args.cache_dir), encoding="utf-8")
    stream = token_stream(tok, texts)
    log(f"tokenizer {'loaded' if args.tokenizer_from else 'trained'} in {time.time() - t0:.1f}s; train stream {len(stream):,d} tokens "
        f"({sum(len(t) for t in texts.values()):,d} chars)")
    probe = [w for name in corpus.SOURCES for w in eval_windows(np.asarray(encode(tok, heldout[name])))[:8]]

    model = build_model(args, tok.get_vocab_size()).to(device)
    model.train()
    counts = param_counts(model)
    log(f"{args.arch} on {device}: params {counts}")

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    batches = Batches(stream, args.batch_size, args.seed)

    max_steps = args.max_steps
    budget_s = args.minutes * 60 if args.minutes is not None else None
    if max_steps is None and budget_s is None:
        budget_s = 40 * 60
    planned_from_time = max_steps is None
    if planned_from_time:
        max_steps = 10**9  # replaced after timing the first steps
    log(f"batch {args.batch_size}x{SEQ_LEN}, lr {args.lr}, warmup {args.warmup}, "
        f"max_steps {args.max_steps}, minutes {args.minutes}, seed {args.seed}")

    t_train = time.time()
    step, tokens, ema, stopped_by_time = 0, 0, None, False
    t_last, tok_last = time.time(), 0
    while step < max_steps:
        lr = lr_at(step, max_steps, args.lr, args.warmup, args.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        x = batches.next().to(device)
        # no ``labels``: the model would shift them and drop each window's last target; the LM
        # loss is taken here on all SEQ_LEN targets, plus a load-balancing loss per layer.
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            outp = model(input_ids=x[:, :-1])
        lm_loss = torch.nn.functional.cross_entropy(
            outp.logits.float().reshape(-1, outp.logits.shape[-1]), x[:, 1:].reshape(-1))
        aux = per_layer_balance_loss(outp.router_logits, model.config.num_experts_per_tok)
        loss = lm_loss + model.config.router_aux_loss_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        step += 1
        tokens += x[:, 1:].numel()
        li = lm_loss.item()
        ema = li if ema is None else 0.95 * ema + 0.05 * li

        # plan from steps 6..25: the first ones are slow on a GPU (CUDA start-up, kernel selection)
        if planned_from_time and step == 5:
            t_plan = time.time()
        if planned_from_time and step == 25:
            per_step = (time.time() - t_plan) / 20
            max_steps = max(step + 1, step + int((budget_s - (time.time() - t_train)) / per_step))
            log(f"planned {max_steps} steps from {per_step:.3f} s/step and a {budget_s / 60:.1f} min budget")
        if step % args.log_every == 0 or step == max_steps:
            now = time.time()
            tps = (tokens - tok_last) / (now - t_last)
            t_last, tok_last = now, tokens
            log(f"step {step:5d}/{max_steps} loss {li:.4f} ema {ema:.4f} aux {aux.item():.4f} "
                f"lr {lr:.2e} gnorm {gnorm.item():.2f} epoch {batches.epoch} tokens {tokens:,d} "
                f"tok/s {tps:.0f} elapsed {(now - t_train) / 60:.1f} min")
        if args.eval_every and step % args.eval_every == 0:
            model.eval()
            nll, n, _ = window_nll(model, probe)
            model.train()
            log(f"step {step:5d} held-out probe loss {nll / n:.4f} ppl {math.exp(nll / n):.2f}")
        if budget_s is not None and time.time() - t_train > budget_s:
            log(f"stopping at step {step}: wall-clock budget of {args.minutes} min reached")
            stopped_by_time = True
            break
    train_s = time.time() - t_train

    model.eval()
    model.cpu().half()
    model.save_pretrained(str(out), safe_serialization=True)
    for f in out.iterdir():
        if f.is_file():
            f.chmod(0o644)
    log(f"saved {out} ({(out / 'model.safetensors').stat().st_size / 1e6:.2f} MB)")
    return {
        "steps": step,
        "planned_steps": max_steps,
        "stopped_by_wall_clock": stopped_by_time,
        "batch_size": args.batch_size,
        "seq_len": SEQ_LEN,
        "tokens_seen": tokens,
        "epochs_over_train_stream": round(tokens / len(stream), 2),
        "train_stream_tokens": int(len(stream)),
        "train_chars": sum(len(t) for t in texts.values()),
        "final_train_loss_ema": round(ema, 4),
        "final_train_loss_last_batch": round(li, 4),
        "train_wall_s": round(train_s, 1),
        "s_per_step": round(train_s / max(1, step), 3),
        "tokens_per_s": round(tokens / train_s, 1),
        "optimizer": {"name": "AdamW", "lr": args.lr, "betas": [0.9, 0.95], "weight_decay": args.weight_decay,
                      "warmup_steps": args.warmup, "schedule": "cosine", "min_lr_ratio": args.min_lr_ratio,
                      "grad_clip": args.clip},
        "seed": args.seed,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "autocast": "bfloat16" if device.type == "cuda" else None,
        "tokenizer_from": args.tokenizer_from,
        "experts_implementation": args.experts_impl,
        "torch_threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------- evaluation


def evaluate(model_dir: Path, args, log: Logger) -> dict:
    """Reload the saved fp16 model in float32 and measure it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = pick_device(args.device)
    set_determinism(args.seed, device)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).to(device)
    model.eval()
    cfg = model.config
    tok = load_tokenizer(model_dir)
    t0 = time.time()

    texts = corpus.train_texts(args.data_dir, args.cache_dir)
    heldout = corpus.heldout_texts(args.data_dir, args.cache_dir)
    wt_test = corpus.wikitext2_test_text(args.data_dir, max_bytes=WIKITEXT_TEST_MAX_CHARS)

    # unigram baseline: token frequencies of the training stream, add-one smoothing
    counts = np.bincount(token_stream(tok, texts), minlength=cfg.vocab_size).astype(np.float64)
    uni_logp = np.log((counts + 1) / (counts.sum() + cfg.vocab_size))

    def unigram_nll(windows):
        return float(-sum(uni_logp[w[1:]].sum() for w in windows))

    report: dict = {"heldout": {}, "wikitext2_test": {}}
    all_nll = all_n = all_uni = 0.0
    load_total = np.zeros((cfg.num_hidden_layers, cfg.num_local_experts), dtype=np.int64)
    for name in corpus.SOURCES:
        wins = eval_windows(np.asarray(encode(tok, heldout[name])))
        nll, n, load = window_nll(model, wins, collect_routing=True)
        u = unigram_nll(wins)
        load_total += load
        all_nll, all_n, all_uni = all_nll + nll, all_n + n, all_uni + u
        report["heldout"][name] = {"chars": len(heldout[name]), "predicted_tokens": n,
                                   "ppl": round(math.exp(nll / n), 3), "unigram_ppl": round(math.exp(u / n), 3)}
        log(f"held-out {name}: ppl {math.exp(nll / n):.3f}, unigram {math.exp(u / n):.3f} ({n} tokens)")
    report["heldout"]["all"] = {"predicted_tokens": int(all_n), "ppl": round(math.exp(all_nll / all_n), 3),
                                "unigram_ppl": round(math.exp(all_uni / all_n), 3),
                                "bits_per_char": round(all_nll / math.log(2) / sum(len(t) for t in heldout.values()), 4)}

    wins = eval_windows(np.asarray(encode(tok, wt_test)))
    nll, n, _ = window_nll(model, wins)
    u = unigram_nll(wins)
    report["wikitext2_test"] = {"chars_used": len(wt_test), "note": f"first {len(wt_test):,d} characters "
                                f"of wikitext-2-test.txt (cut at a line end below {WIKITEXT_TEST_MAX_CHARS:,d})",
                                "predicted_tokens": n, "ppl": round(math.exp(nll / n), 3),
                                "unigram_ppl": round(math.exp(u / n), 3)}
    log(f"wikitext-2 test: ppl {math.exp(nll / n):.3f}, unigram {math.exp(u / n):.3f} ({n} tokens)")

    frac = load_total / load_total.sum(axis=1, keepdims=True)
    report["expert_load_heldout"] = {
        "note": "fraction of top-k routing assignments per expert, per layer, on all held-out windows",
        "per_layer": [[round(float(v), 4) for v in row] for row in frac],
        "min_fraction": round(float(frac.min()), 4),
        "max_fraction": round(float(frac.max()), 4),
        "uniform_fraction": round(1 / cfg.num_local_experts, 4),
    }
    for layer, row in enumerate(frac):
        log(f"layer {layer} expert load " + " ".join(f"{v:.3f}" for v in row))

    report["params"] = param_counts(model)
    report["eval_method"] = (f"float32 forward of the saved float16 weights ({type(model).__name__}.from_pretrained) "
                             f"on {device.type}; "
                             f"token-level perplexity over non-overlapping {SEQ_LEN}-token windows, the first token "
                             f"of each window is context only; unigram = train-split token frequencies with add-one "
                             f"smoothing over the {cfg.vocab_size}-token vocabulary, scored on the same tokens")

    # round trip and samples
    sample_text = heldout["shakespeare"][:2000]
    report["tokenizer_roundtrip_ok"] = tok.decode(encode(tok, sample_text)) == sample_text
    hf_tok = AutoTokenizer.from_pretrained(str(model_dir))
    report["autotokenizer_loads"] = hf_tok.encode(sample_text, add_special_tokens=False) == encode(tok, sample_text)
    samples = {}
    for prompt in ["ROMEO:", "The history of the", "A list in Python"]:
        torch.manual_seed(args.seed)
        ids = torch.tensor([encode(tok, prompt)], device=device)
        gen = model.generate(ids, max_new_tokens=60, do_sample=True, temperature=0.8, top_k=40,
                             pad_token_id=EOS_ID)
        samples[prompt] = tok.decode(gen[0].tolist())
    report["samples"] = {"settings": f"do_sample, temperature 0.8, top_k 40, 60 new tokens, torch seed {args.seed}",
                         **samples}
    report["eval_wall_s"] = round(time.time() - t0, 1)
    return report


# --------------------------------------------------------------------------- main


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="models/zoo/mixtral-mini", help="output folder (Hugging Face layout)")
    p.add_argument("--model-name", help="the model's name in the report (default: the --out folder's name)")
    p.add_argument("--arch", choices=ARCHS, default="mixtral")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=320, help="each expert's intermediate size")
    p.add_argument("--vocab", type=int, default=4096, help="vocabulary of the trained tokenizer")
    p.add_argument("--tokenizer-from", metavar="DIR", help="reuse DIR/tokenizer.json (e.g. models/zoo/mixtral-mini) "
                   "instead of training a tokenizer, so that models share a vocabulary")
    # grouped_mm is the fastest for CPU training here (eager is close; batched_mm runs out of memory)
    p.add_argument("--experts-impl", choices=["grouped_mm", "eager"], default="grouped_mm",
                   help="transformers' experts implementation for training")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: cuda when available (bfloat16 autocast there)")
    p.add_argument("--eval-only", metavar="DIR", help="only evaluate an already saved model folder")
    p.add_argument("--max-steps", type=int, help="training steps (fixes the schedule; reproducible)")
    p.add_argument("--minutes", type=float, help="wall-clock budget of the training loop: plans the steps when "
                   "--max-steps is absent (default 40), and stops training once exceeded")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=250, help="held-out probe every N steps (0: never)")
    p.add_argument("--data-dir", help="data folder (default $EDGEMOE_DATA_DIR or <repo>/data)")
    p.add_argument("--cache-dir", help="python3.11-doc cache folder (default models/zoo/.corpus; fetched with apt "
                   "when empty; corpus.py --export-cache fills one for machines without apt)")
    args = p.parse_args(argv)

    argv_list = sys.argv[1:] if argv is None else list(argv)
    if __package__:
        command = "python -m " + __package__ + ".train_moe " + shlex.join(argv_list)
    else:
        script = Path(sys.argv[0]).resolve()
        try:
            script = script.relative_to(Path.cwd())
        except ValueError:
            pass
        command = shlex.join(["python", str(script), *argv_list])

    if args.eval_only:
        model_dir = Path(args.eval_only)
        log = Logger(model_dir / "train.log")
        log(f"$ {command}")
        report_path = model_dir / "train_report.json"
        old = json.loads(report_path.read_text()) if report_path.exists() else {}
        report = {**old, "evaluation": evaluate(model_dir, args, log)}
    else:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        log = Logger(out / "train.log", "w")
        log(f"$ {command}")
        log(f"torch {torch.__version__}, transformers {__import__('transformers').__version__}, "
            f"tokenizers {__import__('tokenizers').__version__}")
        training = train(args, log)
        model_dir, report_path = out, out / "train_report.json"
        report = {"command": command, "model": args.model_name or out.resolve().name, "arch": args.arch,
                  "training": training,
                  "versions": {"torch": torch.__version__,
                               "transformers": __import__("transformers").__version__,
                               "tokenizers": __import__("tokenizers").__version__}}
        report["evaluation"] = evaluate(model_dir, args, log)
    report_path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    log(json.dumps(report, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
