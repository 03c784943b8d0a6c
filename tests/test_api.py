"""The Python API at the top of the package (edgemoe.compile, edgemoe.Session) and the pieces it
shares with the C CLI: the sampler and the tokenizer, which must give the same text from the same
seed in either."""
from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest

import edgemoe
from edgemoe.runtime import DEFAULT_BUILD_DIR, EdgeMoEError, Sampler

from conftest import DATA_DIR, TRAINED_MODEL


def test_sampler_greedy_seeded_and_filtered(runtime_lib, rng):
    logits = rng.normal(size=64).astype(np.float32)
    assert Sampler(64).sample(logits, []) == int(np.argmax(logits))
    draws = lambda seed, **kw: [Sampler(64, seed=seed, **kw).sample(logits, []) for _ in range(1)]  # noqa: E731
    s1, s2 = Sampler(64, temperature=1.0, seed=5), Sampler(64, temperature=1.0, seed=5)
    assert [s1.sample(logits, []) for _ in range(50)] == [s2.sample(logits, []) for _ in range(50)]
    top3 = set(np.argsort(-logits)[:3].tolist())
    s = Sampler(64, temperature=2.0, top_k=3, seed=1)
    assert {s.sample(logits, []) for _ in range(200)} == top3  # top-k: only those, and all of them
    s = Sampler(64, temperature=1.0, top_p=1e-6, seed=1)
    assert {s.sample(logits, []) for _ in range(20)} == {int(np.argmax(logits))}
    best = int(np.argmax(np.abs(logits)))
    penalised = Sampler(64, repetition_penalty=100.0).sample(logits, [int(np.argmax(logits))])
    assert penalised != int(np.argmax(logits)) or best != int(np.argmax(logits))
    assert draws(3) == draws(3)
    for kwargs, message in ((dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"),
                            (dict(repetition_penalty=0.0), "repetition_penalty")):
        with pytest.raises(EdgeMoEError, match=message):
            Sampler(64, **kwargs)


def test_session_generates_streamed_sampled_text_with_stop_strings(artifact_int4):
    with edgemoe.Session(artifact_int4, cache_fraction=0.25) as s:
        pieces = list(s.generate("ROMEO:", max_tokens=32, temperature=0.8, seed=1))
        again = "".join(s.generate("ROMEO:", max_tokens=32, temperature=0.8, seed=1))
        other = "".join(s.generate("ROMEO:", max_tokens=32, temperature=0.8, seed=2))
        greedy = "".join(s.generate("ROMEO:", max_tokens=32))
        ids = list(s.tokens("ROMEO:", max_tokens=32))
        assert s.stats()["expert_misses"] > 0
        stop = greedy[5:9]
        stopped = "".join(s.generate("ROMEO:", max_tokens=32, stop=[stop]))
    assert len(pieces) > 1 and "".join(pieces) == again and again != other
    assert greedy == s.tokenizer.decode(ids)
    assert stopped == greedy[: greedy.find(stop)]


def test_chat_applies_the_models_template(artifact_int4, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(artifact_int4, art)
    with pytest.raises(ValueError, match="no chat template"):
        edgemoe.Session(art).apply_chat_template([{"role": "user", "content": "hi"}])
    config = json.loads((art / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{{ bos_token }}{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}\n"
                               "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    (art / "tokenizer_config.json").write_text(json.dumps(config))
    messages = [{"role": "system", "content": "Speak as Romeo."}, {"role": "user", "content": "Who is Juliet?"}]
    with edgemoe.Session(art) as s:
        prompt = s.apply_chat_template(messages)
        assert prompt == "<s>SYSTEM: Speak as Romeo.\nUSER: Who is Juliet?\nASSISTANT:"
        assert "".join(s.chat(messages, max_tokens=16)) == "".join(s.generate(prompt, max_tokens=16))


def _c_tokenizer(lib):
    import ctypes

    lib.em_tokenizer_open.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p,
                                      ctypes.c_size_t]
    lib.em_tokenize.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int32), ctypes.c_size_t,
                                ctypes.POINTER(ctypes.c_size_t)]
    lib.em_tokenizer_close.argtypes = [ctypes.c_void_p]

    def encode(handle, text):
        ids, n = (ctypes.c_int32 * 8192)(), ctypes.c_size_t()
        assert lib.em_tokenize(handle, text.encode(), ids, 8192, ctypes.byref(n)) == 0
        return list(ids[: n.value])

    return encode


def test_the_c_tokenizer_encodes_as_tokenizers_does(artifact_int4, runtime_lib, tokenizer, rng):
    import ctypes

    handle, err = ctypes.c_void_p(), ctypes.create_string_buffer(512)
    assert runtime_lib.em_tokenizer_open(str(artifact_int4).encode(), ctypes.byref(handle), err, 512) == 0, err.value
    encode = _c_tokenizer(runtime_lib)
    texts = ["ROMEO:\nWhat light through yonder window", "Hello  world!!  it's 2024 ,   ok\n\n\tthe end  ",
             "café naïve 中文 😀 ½ ٣ x'll don't", "<s>hi</s> there<unk>", "   leading", "trailing   ", "a\n\n\nb",
             "'''s ''x", ""]
    for name in ("wikitext-2-test.txt", "tinyshakespeare.txt"):
        corpus = (DATA_DIR / name).read_text()
        for start in rng.integers(0, len(corpus) - 400, 60):
            texts.append(corpus[start : start + int(rng.integers(1, 400))])
    try:
        for text in texts:
            assert encode(handle, text) == tokenizer.encode(text).ids, repr(text)
    finally:
        runtime_lib.em_tokenizer_close(handle)


def test_c_cli_and_python_give_the_same_text_from_the_same_seed(artifact_int4):
    with edgemoe.Session(artifact_int4) as s:
        for kwargs in (dict(temperature=0.8, seed=1), dict(temperature=1.1, top_k=40, top_p=0.9,
                                                            repetition_penalty=1.2, seed=42), dict()):
            text = "".join(s.generate("ROMEO:", max_tokens=32, **kwargs))
            args = [f"--{k.replace('_', '-')}={v}" for k, v in kwargs.items()]
            args = [a for pair in (x.split("=", 1) for x in args) for a in pair]
            proc = subprocess.run([str(DEFAULT_BUILD_DIR / "edgemoe_run"), str(artifact_int4), "--prompt", "ROMEO:",
                                   "-n", "32", *args], capture_output=True, text=True, timeout=120)
            assert proc.returncode == 0, proc.stderr
            assert proc.stdout.startswith(text + "\n"), (kwargs, proc.stdout[:200], text)


def test_compile_at_the_top_of_the_package(tiny_mixtral_dir, tmp_path, runtime_lib):
    manifest = edgemoe.compile(tiny_mixtral_dir, tmp_path / "art", bits=8, max_seq=32)
    assert manifest["quantization"]["expert_bits"] == 8 and (tmp_path / "art" / "manifest.json").is_file()
    with edgemoe.Session(tmp_path / "art") as s:
        assert len(list(s.tokens([1, 2, 3], max_tokens=5))) <= 5
    assert TRAINED_MODEL.is_dir()


def test_the_c_unicode_classes_are_generated_from_unicodedata():
    from edgemoe.compiler import tokenizer_file
    from edgemoe.runtime import REPO_ROOT

    header = REPO_ROOT / "runtime_c" / "src" / "generated" / "unicode_classes.h"
    assert header.read_text() == tokenizer_file.unicode_table_header(), \
        "regenerate: python -m edgemoe.compiler.tokenizer_file > runtime_c/src/generated/unicode_classes.h"


def test_a_tokenizer_the_c_runtime_cannot_reproduce_is_named(tmp_path):
    from edgemoe.compiler.tokenizer_file import write_tokenizer

    spec = json.loads((TRAINED_MODEL / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "Lowercase"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    assert "normalizes" in write_tokenizer(tmp_path / "tokenizer.json", tmp_path / "tokenizer.bin")
    assert not (tmp_path / "tokenizer.bin").exists()
