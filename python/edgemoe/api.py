"""The Python API: compile a checkpoint, open an artifact, generate text (streamed, sampled as the
C runtime samples), chat with the model's own template.

    import edgemoe
    edgemoe.compile("models/zoo/mixtral-mini", "build/host", calibration="models/zoo/mixtral-mini/calibration.txt")
    with edgemoe.Session("build/host", cache_fraction=0.25) as s:
        for piece in s.generate("ROMEO:", max_tokens=32, temperature=0.8, seed=1):
            print(piece, end="", flush=True)
"""
from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

from . import runtime


def compile(model_dir: str | Path, output: str | Path, *, target: str = "host", bits: int = 4,
            trunk_bits: int | None = None, calibration: str | Path | None = None, calibration_tokens: int = 8192,
            tolerance: float | None = None, max_bits: float | None = None, sensitivity: str = "auto",
            search_text: str | Path | None = None, group: int | None = None, max_seq: int | None = None, int_dot: bool | None = None, tune: bool = False,
            jobs: int | None = None, dask_scheduler: str | None = None, int4_grid: str = "auto",
            rounding: str = "search", kv_cache: str = "float32", log=None) -> dict:
    """Compile the checkpoint in model_dir for `target` into the artifact directory `output`
    (written whole or not at all); returns its manifest. Options as edgemoe-compile's."""
    from .compiler.driver import CompileOptions, compile_model

    opts = CompileOptions(target=target, expert_bits=bits, calibration=Path(calibration) if calibration else None,
                          calibration_tokens=calibration_tokens, tolerance=tolerance, max_bits=max_bits,
                          sensitivity=sensitivity, search_text=Path(search_text) if search_text else None, max_seq=max_seq, int_dot=int_dot,
                          tune=tune, jobs=jobs, dask_scheduler=dask_scheduler, int4_grid=int4_grid, rounding=rounding,
                          kv_cache=kv_cache)
    if trunk_bits is not None:
        opts.trunk_bits = trunk_bits
    if group is not None:
        opts.group = group
    return compile_model(model_dir, output, opts, log=log or (lambda message: None))


class Session:
    """A compiled artifact open in the C runtime, with its tokenizer.

    budget: bytes for everything the runtime holds (None: every expert resident); or
    cache_fraction: the share of the experts the expert cache holds (0 = the minimum). The other
    keywords are runtime.Session's (predictor, eviction, storage, threads, ...)."""

    def __init__(self, artifact: str | Path, *, budget: int | None = None, cache_fraction: float | None = None,
                 max_seq: int = 0, **runtime_options):
        self.artifact = Path(artifact)
        if budget is not None and cache_fraction is not None:
            raise ValueError("give budget or cache_fraction, not both")
        if cache_fraction is not None:
            budget = runtime.budget_bytes(self.artifact, max_seq, cache_fraction)
        self.runtime = runtime.Session(self.artifact, memory_budget=budget or 0, max_seq=max_seq, **runtime_options)
        self.info = self.runtime.info
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            path = self.artifact / "tokenizer.json"
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: the artifact was compiled from a checkpoint without a "
                                        "tokenizer; generate from token ids with edgemoe.runtime.Session")
            self._tokenizer = Tokenizer.from_file(str(path))
        return self._tokenizer

    def tokens(self, prompt: str | Sequence[int], max_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int = 0) -> Iterator[int]:
        """The generated token ids, one at a time, from a fresh context: at most max_tokens, ending
        early at the model's EOS token (not yielded)."""
        ids = self.tokenizer.encode(prompt).ids if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) + max_tokens > self.info["max_seq"]:
            raise ValueError(f"{len(ids)} prompt tokens + {max_tokens} new tokens exceed the context of "
                             f"{self.info['max_seq']}")
        sampler = runtime.Sampler(self.info["vocab_size"], temperature, top_k, top_p, repetition_penalty, seed)
        try:
            self.runtime.reset()
            logits, history = self.runtime.prefill(ids), list(ids)
            for _ in range(max_tokens):
                token = sampler.sample(logits, history)
                if token == self.info["eos_token_id"]:
                    return
                yield token
                history.append(token)
                logits = self.runtime.decode_step(token)
        finally:
            sampler.close()

    def generate(self, prompt: str | Sequence[int], max_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int = 0,
                 stop: str | Sequence[str] | None = None) -> Iterator[str]:
        """The generated text, streamed in pieces as tokens complete characters; ends at EOS, at
        max_tokens, or before the first of the `stop` strings."""
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        hold = max((len(s) for s in stops), default=1) - 1  # text that could still grow into a stop string
        out: list[int] = []
        sent = 0
        for token in self.tokens(prompt, max_tokens, temperature, top_k, top_p, repetition_penalty, seed):
            out.append(token)
            text = self.tokenizer.decode(out)
            cut = min((i for i in (text.find(s, max(sent - hold, 0)) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                if cut > sent:
                    yield text[sent:cut]
                return
            ready = len(text) - hold
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
                ready = min(ready, len(text) - 1)
            if ready > sent:
                yield text[sent:ready]
                sent = ready
        text = self.tokenizer.decode(out)
        if len(text) > sent:
            yield text[sent:]

    def chat(self, messages: Sequence[dict], **generate_options) -> Iterator[str]:
        """The assistant's reply to `messages` ([{"role": ..., "content": ...}, ...]), the model's
        chat template (tokenizer_config.json's chat_template, rendered as transformers renders it)
        applied with a generation prompt."""
        return self.generate(self.apply_chat_template(messages), **generate_options)

    def apply_chat_template(self, messages: Sequence[dict]) -> str:
        config_path = self.artifact / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if not template:
            raise ValueError(f"{self.artifact}: the model has no chat template (tokenizer_config.json has no "
                             "chat_template); use generate() with a prompt")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise ValueError(f"the chat template refused the messages: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        special = {k: (v if isinstance(v, str) else (v or {}).get("content", ""))
                   for k, v in config.items() if k.endswith("_token")}
        return env.from_string(template).render(messages=list(messages), add_generation_prompt=True, **special)

    def stats(self) -> dict:
        return self.runtime.stats()

    def close(self) -> None:
        self.runtime.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
