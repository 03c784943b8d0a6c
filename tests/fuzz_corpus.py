"""The fuzz harnesses' seed corpus (runtime_c/fuzz/corpus): a small random model's valid files and
the crafted cases of crafted.py made from them (image/ seeds the image and session harnesses,
trunk/ the trunk harness).

    python tests/fuzz_corpus.py            # rewrite runtime_c/fuzz/corpus

tests/test_fuzz.py compiles the same model (same seed, same shapes) for the session harness's
trunk.bin and kernels.so, which depend on the machine and are not committed."""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE.parent / "runtime_c" / "fuzz" / "corpus"


def build_corpus_model(root: Path) -> Path:
    """A 2-layer, 4-expert random Mixtral small enough that each record is one 4 KiB page; returns
    its compiled artifact."""
    import torch
    import transformers

    from edgemoe.compiler.driver import CompileOptions, compile_model

    cfg = transformers.MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
        tie_word_embeddings=False)
    torch.manual_seed(7)
    transformers.MixtralForCausalLM(cfg).save_pretrained(root / "model")
    compile_model(root / "model", root / "artifact", CompileOptions(expert_bits=4, max_seq=32), log=lambda m: None)
    return root / "artifact"


def write_corpus(art: Path, corpus: Path) -> None:
    sys.path.insert(0, str(HERE))
    from crafted import copy_artifact, image_cases, image_records, patch_image, patch_trunk, trunk_cases

    shutil.rmtree(corpus, ignore_errors=True)
    for d in ("image", "trunk"):
        (corpus / d).mkdir(parents=True)
    shutil.copy(art / "experts.bin", corpus / "image" / "valid")
    shutil.copy(art / "trunk.bin", corpus / "trunk" / "valid")
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, (how, _)) in enumerate(image_cases(image_records(art)).items()):
            work = copy_artifact(art, Path(tmp) / f"i{i}")
            patch_image(work, **how)
            slug = name.replace(" ", "-").replace("^", "")
            shutil.copy(work / "experts.bin", corpus / "image" / slug)
        for i, (name, (how, _)) in enumerate(trunk_cases().items()):
            work = copy_artifact(art, Path(tmp) / f"t{i}")
            patch_trunk(work, **how)
            shutil.copy(work / "trunk.bin", corpus / "trunk" / name.replace(" ", "-"))


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        write_corpus(build_corpus_model(Path(tmp)), CORPUS)
    print(f"wrote {sum(1 for _ in CORPUS.rglob('*') if _.is_file())} files under {CORPUS}")
