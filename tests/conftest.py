"""Shared fixtures: models and artifacts are built once per test session and reused."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import _no_outside_reads

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
TRAINED_MODEL = Path(os.environ.get("EDGEMOE_TEST_MODEL", REPO / "models" / "zoo" / "mixtral-mini"))
# The text corpora ship with the repository (data/README.md: sources and licences).
DATA_DIR = Path(os.environ.get("EDGEMOE_DATA_DIR", REPO / "data"))


def pytest_configure(config):
    """Fail any test that opens a file beside the checkout (e.g. ../shared): see _no_outside_reads."""
    if not config.pluginmanager.has_plugin("edgemoe-no-outside-reads"):
        _no_outside_reads.register(config)


@pytest.fixture(scope="session")
def runtime_lib():
    """The C runtime, built from runtime_c/ for this test session (CMake)."""
    from edgemoe import runtime

    runtime.build_runtime()
    return runtime.library()


@pytest.fixture(scope="session")
def tiny_mixtral_dir(tmp_path_factory) -> Path:
    """A random-weight Mixtral built by transformers from a config and saved as safetensors."""
    import torch
    import transformers

    cfg = transformers.MixtralConfig(
        vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128,
        rope_theta=10000.0, tie_word_embeddings=False)
    torch.manual_seed(1234)
    model = transformers.MixtralForCausalLM(cfg)
    out = tmp_path_factory.mktemp("tiny_mixtral")
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_with_tokenizer(tiny_mixtral_dir, tmp_path_factory):
    """The tiny Mixtral with a character-level tokenizer of its 160-token vocabulary, so the
    compiler can read calibration and search text for it (a compile with --calibration and a
    bit-plan search in seconds)."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    out = tmp_path_factory.mktemp("tiny_tok")
    for f in tiny_mixtral_dir.iterdir():
        shutil.copy(f, out / f.name)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([CALIBRATION.read_text(encoding="utf-8")],
                            trainers.BpeTrainer(vocab_size=160, special_tokens=["<unk>"]))
    assert tok.get_vocab_size() <= 160
    tok.save(str(out / "tokenizer.json"))
    return out


@pytest.fixture(scope="session")
def onnx_exports(tmp_path_factory):
    """(family, config changes) → (its tiny HF directory from tests/families.py, a directory holding
    its export as torch.onnx writes it (edgemoe.onnx_reference.export) and the config.json it came
    from), each exported once per session (an export takes ~10 s). Not to be altered: copy first."""
    import json
    import shutil

    from edgemoe.onnx_reference import export
    from families import save_checkpoint

    made = {}

    def get(family: str, **changes) -> tuple[Path, Path]:
        key = json.dumps([family, changes], sort_keys=True)
        if key not in made:
            d = tmp_path_factory.mktemp(f"onnx_{family}")
            hf = save_checkpoint(family, d / "hf", **changes)
            (d / "onnx").mkdir()
            export(hf, d / "onnx" / "model.onnx")
            shutil.copy(hf / "config.json", d / "onnx" / "config.json")
            made[key] = hf, d / "onnx"
        return made[key]

    return get


@pytest.fixture(scope="session")
def trained_model():
    from edgemoe.models import load_model

    if not (TRAINED_MODEL / "model.safetensors").is_file():
        pytest.fail(f"bundled model missing at {TRAINED_MODEL}")
    return load_model(TRAINED_MODEL)


# Calibration text for profiling routing: part of the training data, never the held-out text.
CALIBRATION = TRAINED_MODEL / "calibration.txt"


def _compile(tmp_path_factory, model_dir: Path, bits: int, name: str) -> Path:
    from edgemoe.compiler.driver import CompileOptions, compile_model

    if not CALIBRATION.is_file():
        pytest.fail(f"calibration text {CALIBRATION} missing: it ships with the bundled model")
    out = tmp_path_factory.mktemp(name)
    opts = CompileOptions(expert_bits=bits, max_seq=256, calibration=CALIBRATION, calibration_tokens=4096)
    compile_model(model_dir, out, opts, log=lambda m: None)
    return out


def records(artifact: Path):
    """The expert records of an artifact as (table without the compile id, the data): experts.bin's
    bytes but the compile id its header carries."""
    from edgemoe.compiler.expert_image import read_table

    head, recs = read_table(artifact / "experts.bin")
    return recs, (artifact / "experts.bin").read_bytes()[head.data_offset:]


@pytest.fixture(scope="session")
def artifact_int4(tmp_path_factory, runtime_lib) -> Path:
    return _compile(tmp_path_factory, TRAINED_MODEL, 4, "mini_int4")


@pytest.fixture(scope="session")
def artifact_int8(tmp_path_factory, runtime_lib) -> Path:
    return _compile(tmp_path_factory, TRAINED_MODEL, 8, "mini_int8")


@pytest.fixture(scope="session")
def tokenizer():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(TRAINED_MODEL / "tokenizer.json"))


PROMPTS = [
    "ROMEO:\nWhat light through yonder window",
    "The history of the city begins in",
    "To create a list in Python, use",
]


@pytest.fixture
def rng(request):
    """Fresh random inputs every run; the seed is printed on failure for reproduction."""
    seed = int.from_bytes(os.urandom(4), "little")
    request.node.user_properties.append(("seed", seed))
    print(f"random seed {seed}")
    return np.random.default_rng(seed)


def assert_matches_reference(got: np.ndarray, want: np.ndarray, artifact: Path, tol: float) -> None:
    """Runtime logits `got` against the NumPy reference `want` for the same quantized weights.

    With float-dequantizing kernels (rows layout) both compute the same float arithmetic in other
    orders: within `tol` of the largest logit. Integer-dot kernels (tiles layout) round each input
    vector to int8 codes; the runtime and NumPy reach those inputs by different summation orders,
    so a value within an ulp of a rounding boundary can take the neighbouring code in one of them,
    and through the KV cache (and an encoder's output) the offset persists: per position, the mean
    deviation must stay within 2% of the mean logit at the median (measured: under 1.5%). Where
    such an offset tips a near tie of the router, that position alone takes another expert and may
    move far (seen: one position of 21 at 37%, Switch top-1 with INT2 experts): at most a tenth of
    the positions may deviate by over 5%."""
    import json

    layout = json.loads((artifact / "manifest.json").read_text())["quantization"]["layout"]
    diff = np.abs(got - want)
    if layout == "rows":
        assert diff.max() <= tol * max(1.0, np.abs(want).max()), diff.max()
    else:
        per_position = np.atleast_2d(diff).mean(axis=-1) / np.abs(want).mean()
        assert np.median(per_position) <= 0.02 and np.mean(per_position > 0.05) <= 0.1, per_position


def tie_distance(cfg, logits: np.ndarray, bias, chosen) -> float:
    """How far (relative to the largest |logit|) the router logits must move, raising the `chosen`
    experts and lowering the rest, before the config's routing picks `chosen`: 0 where it already
    does, 1 or more where no near tie explains the choice."""
    from edgemoe.models.reference import route_rows

    scale = max(1e-12, float(np.abs(logits).max()))
    push = np.where(np.isin(np.arange(logits.size), chosen), 1.0, -1.0)

    def picks(d: float) -> bool:
        return sorted(route_rows(cfg, (logits + d * scale * push)[None], bias)[0][0].tolist()) == sorted(chosen)

    if picks(0.0):
        return 0.0
    if not picks(1.0):
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(30):
        lo, hi = (lo, (lo + hi) / 2) if picks((lo + hi) / 2) else ((lo + hi) / 2, hi)
    return hi


def assert_routing_matches_reference(trace: np.ndarray, ref, artifact: Path) -> None:
    """The runtime's routing trace [tokens, expert layers, top_k] against the reference executor's
    choices. Where they differ the reference must have been at a near tie (see
    assert_matches_reference: with integer-dot kernels an input code off by one can tip it, and the
    offset then persists): its router logits within 5% of their largest moving picks the runtime's
    experts (float-dequantizing kernels: within 1e-3), and at most a tenth of the choices differ."""
    import json

    layout = json.loads((artifact / "manifest.json").read_text())["quantization"]["layout"]
    tie = 1e-3 if layout == "rows" else 0.05
    cfg = ref.model.config
    layers = [layer for layer in ref.model.layers if layer.dense is None]
    got = trace.tolist()
    assert len(got) == len(ref.trace), (len(got), len(ref.trace))
    differ, choices = [], 0
    for t, (got_t, want_t, logits_t) in enumerate(zip(got, ref.trace, ref.router_trace)):
        for li, (g, w, logits, layer) in enumerate(zip(got_t, want_t, logits_t, layers)):
            choices += 1
            if sorted(g) != sorted(int(i) for i in w):
                differ.append((t, li, tie_distance(cfg, logits, layer.router_bias, g)))
    assert all(d <= tie for *_, d in differ) and len(differ) <= choices / 10, differ


def assert_greedy_matches_reference(tokens: list[int], logits: np.ndarray, ref_tokens: list[int],
                                    ref_logits: np.ndarray, artifact: Path, tol: float) -> None:
    """Greedy runtime tokens against the reference's, and the logits that chose them.

    With integer-dot kernels (see assert_matches_reference) the two may part at a near tie: only
    where the reference's logit for the runtime's token is within 2% of the mean |logit| of its
    best. Up to that position every token must agree; the logits are compared over it."""
    import json

    n = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), len(tokens))
    if n < len(tokens):
        layout = json.loads((artifact / "manifest.json").read_text())["quantization"]["layout"]
        margin = ref_logits[n][ref_tokens[n]] - ref_logits[n][tokens[n]]
        assert layout == "tiles" and margin <= 0.02 * np.abs(ref_logits[: n + 1]).mean(), \
            (f"tokens part at {n} with a reference margin of {margin:.4f}", tokens, ref_tokens)
    assert_matches_reference(logits[: n + 1], ref_logits[: n + 1], artifact, tol)


def fake_ndk(root: Path, *compilers: str) -> Path:
    """An NDK's directory layout with (empty, executable) compiler entries: what the path lookup sees."""
    from edgemoe.targets import toolchain

    bin_dir = root / "toolchains" / "llvm" / "prebuilt" / toolchain.ndk_host_tag() / "bin"
    bin_dir.mkdir(parents=True)
    for name in compilers:
        (bin_dir / name).write_text("")
        (bin_dir / name).chmod(0o755)
    (root / "build" / "cmake").mkdir(parents=True)
    (root / "build" / "cmake" / "android.toolchain.cmake").write_text("")
    return bin_dir
