"""onnxruntime as an independent executor of a `transformers` checkpoint: the model exported with
torch.onnx (the dynamo exporter; experts as batched matmuls, which ONNX can express) and run on
onnxruntime's CPU provider. It shares no code with the project's reference executor or runtime, so
it cross-checks both (tests) and gives an all-in-RAM baseline (edgemoe-bench onnxruntime).

The exported graph maps token ids [batch, seq] to logits [batch, seq, vocab], with no KV cache.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _logits_only(model):
    """The causal LM as a module with one input (token ids) and one output (logits), for the exporter."""
    import torch

    class LogitsOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids):
            return self.model(input_ids=input_ids, use_cache=False).logits

    return LogitsOnly()


def export(model_dir: str | Path, out: str | Path) -> Path:
    """Exports the checkpoint in model_dir (float32) to the ONNX file `out`; returns its path."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    # ONNX has no grouped matmul: the experts run as batched matmuls over the routed tokens
    model.set_experts_implementation("batched_mm")
    ids = torch.zeros((2, 8), dtype=torch.int64)  # batch ≥ 2, else the exporter fixes batch at 1
    dims = {"input_ids": {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")}}
    out = Path(out)
    with torch.no_grad():
        torch.onnx.export(_logits_only(model), (ids,), out, dynamo=True, input_names=["input_ids"],
                          output_names=["logits"], dynamic_shapes=dims, verbose=False)
    return out


class OnnxModel:
    """An exported model on onnxruntime's CPU provider."""

    def __init__(self, path: str | Path, threads: int = 1):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def logits(self, tokens) -> np.ndarray:
        """[len(tokens), vocab] logits of the token sequence (float32)."""
        ids = np.asarray(tokens, dtype=np.int64)[None, :]
        return self.session.run(["logits"], {"input_ids": ids})[0][0]

    def greedy(self, prompt, n_new: int) -> list[int]:
        """n_new greedy tokens after the prompt (each step runs the whole sequence: no KV cache)."""
        seq, out = list(prompt), []
        for _ in range(n_new):
            out.append(int(self.logits(seq)[-1].argmax()))
            seq.append(out[-1])
        return out
