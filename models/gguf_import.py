"""Reading a GGUF file (llama.cpp's format) strictly into the same MoEModel the Hugging Face
importers produce.

Which files: ``load_model(path)`` takes a GGUF when ``path`` ends in ``.gguf``, or is a directory
holding exactly one ``*.gguf`` file and no config.json (a directory with config.json is a Hugging
Face checkpoint). Split GGUFs (``split.count`` > 1) must be merged first (``llama-gguf-split --merge``).

Which architectures: llama.cpp names the architecture in ``general.architecture``; each family
folder that has a llama.cpp counterpart declares it in its ``GGUF`` table (a ``GGUFArch`` below):

=============  ===========  ================================================================
llama.cpp      family       notes
=============  ===========  ================================================================
``llama``      mixtral      only with ``llama.expert_count`` > 0 (a dense Llama is refused);
                            q/k rows un-permuted (below)
``qwen2moe``   qwen2_moe    q/k/v biases; shared expert ``ffn_*_shexp`` gated by
                            sigmoid(``ffn_gate_inp_shexp`` · x)
``qwen3moe``   qwen3_moe    ``attn_q_norm``/``attn_k_norm`` per head
``olmoe``      olmoe        ``attn_q_norm``/``attn_k_norm`` over the whole projection
=============  ===========  ================================================================

GraniteMoE (llama.cpp ``granitemoe``) has no GGUF table yet and is refused like any other
architecture.

Hyper-parameters come from the metadata (``{arch}.embedding_length``, ``.block_count``,
``.attention.head_count(_kv)``, ``.attention.key_length``, ``.expert_count``,
``.expert_used_count``, ``.expert_feed_forward_length`` (else ``.feed_forward_length``),
``.expert_shared_feed_forward_length``, ``.context_length``, ``.rope.freq_base``,
``.attention.layer_norm_rms_epsilon``; ``tokenizer.ggml.bos_token_id``/``eos_token_id``), the
vocabulary size from ``token_embd``'s rows, tied embeddings from the absence of ``output``.
Whether the top-k router weights are renormalised is not stored in a GGUF: llama.cpp fixes it per
architecture (``build_moe_ffn``'s ``norm_w``: llama and qwen3moe yes, qwen2moe and olmoe no), and
so does the table; an ``{arch}.expert_weights_norm`` saying otherwise is refused.

Strict, as ``hf_import`` is for config.json and safetensors: an ``{arch}.*`` key this importer does
not read (rope scaling, sliding windows, logit soft-capping, leading dense blocks, …) or a tensor
it does not load (``rope_freqs``, ``attn_rot_embd``, a dense ``ffn_gate``, a bias the
architecture does not have, …) is refused naming it. ``general.*``, ``tokenizer.*``,
``quantize.*`` and ``split.*`` keys cannot change the arithmetic and are not checked (beyond
``general.type`` = "model" and ``split.count`` ≤ 1).

RoPE: llama.cpp's converter (``LlamaModel.permute`` in convert_hf_to_gguf.py) reorders the rows of
the q and k projections of the ``llama`` architecture, within each head, from Hugging Face's
rotate-half layout (pairs (i, i + d/2)) to ggml's interleaved one (pairs (2i, 2i + 1)):
``w.reshape(heads, 2, d/2, in).swapaxes(1, 2)``. The import undoes it
(``reshape(heads, d/2, 2, in).swapaxes(1, 2)``), so the rotate-half RoPE of the reference and the
runtime gives the same numbers. ``qwen2moe``, ``qwen3moe`` and ``olmoe`` use ggml's NEOX
(rotate-half) RoPE and are stored unpermuted.

Tensor types: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the k-quants Q2_K…Q6_K are
dequantized to float32 (``gguf.quants.dequantize``); any other type is refused naming the tensor.
llama-quantize mixes types into its files: its Q4_0 of an 8-expert llama holds Q5_K ``attn_k``,
Q8_0 ``attn_v`` and a Q6_K output matrix (the tied ``token_embd`` included); its Q4_K_M puts
experts in Q4_K, Q5_0 and Q8_0. The
compiler then quantizes as it does an HF checkpoint, but for Q8_0 and Q4_0 matrices at group 32:
their blocks are integer levels times a float16 scale per 32 weights (``stored_levels``), which
compiler/quantize.py repacks without rounding them again — Q8_0 into INT8, Q4_0 into INT8 or into
INT4 on the integer grid (levels -8…7), which the compile picks for the experts when all of them
are Q4_0 (compiler/driver.py ``int4_grid``).

Streaming: the matrices stay in the file (``GGUFTensor``: a byte range of the memory-mapped file,
dequantized when used: the routed experts one at a time, the trunk a layer at a time), as an HF
checkpoint's safetensors do, so a GGUF of a model many times the RAM compiles through the
streaming path (the llama architecture's q/k too: ``RowOrder`` reorders their rows as they are
read). Vectors and routers are read at once.

Tokenizer: a GGUF carries its vocabulary (``tokenizer.ggml.*``), which ``read_vocabulary`` exposes;
``tokenizer_files`` turns a byte-level BPE one split as GPT-2 splits (llama.cpp's pre-tokenizers
"gpt-2", "olmo") into tokenizer.json and tokenizer_config.json (BOS, EOS, chat template), which the
compiler places in the artifact (compiler/driver.py place_tokenizer). For other vocabularies
(SentencePiece "llama", Qwen's split) put the model's ``tokenizer.json`` beside the .gguf, or feed
token ids.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import Expert, Layer, MoEConfig, MoEModel
from .hf_import import ModelImportError
from .stored_tensor import FileTensor, RowOrder

SUFFIX = ".gguf"
# Key prefixes that cannot change what the decoder computes: authorship and bookkeeping, the
# tokenizer (read separately), the quantizer's importance-matrix provenance, the split bookkeeping
# of a one-file split (split.count > 1 is refused before).
INERT_PREFIXES = ("general.", "tokenizer.", "quantize.", "split.")
# GGML types the import dequantizes (gguf.constants.GGMLQuantizationType names).
DEQUANTIZED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                     "Q6_K")


@dataclass(frozen=True)
class GGUFArch:
    """How one llama.cpp architecture maps onto a family's MoEConfig (a family folder's ``GGUF``)."""

    name: str  # llama.cpp's general.architecture ("llama", "qwen2moe", …)
    family: str  # MoEConfig.arch of the family
    label: str  # the family's name in messages
    norm_topk_prob: bool  # llama.cpp's fixed norm_w of build_moe_ffn for this architecture
    qk_norm: str = "none"  # as MoEConfig.qk_norm: attn_q_norm / attn_k_norm per "head" or "full"
    qkv_bias: bool = False  # attn_q/k/v.bias in every layer
    shared_expert: bool = False  # ffn_{gate,up,down}_shexp gated by sigmoid(ffn_gate_inp_shexp · x)
    permuted_qk: bool = False  # the converter interleaved q/k rows for ggml's NORM RoPE: undo it


def gguf_file(path: str | Path) -> Path | None:
    """The GGUF file `path` names — itself if it ends in .gguf, the single .gguf of a directory
    without config.json — or None when `path` is not a GGUF checkpoint."""
    p = Path(path)
    if p.suffix.lower() == SUFFIX:
        if not p.is_file():
            raise ModelImportError(f"{p} not found (or not a file)")
        return p
    if not p.is_dir() or (p / "config.json").exists():
        return None
    found = sorted(q for q in p.iterdir() if q.suffix.lower() == SUFFIX and q.is_file())
    if len(found) > 1:
        raise ModelImportError(f"{p} holds {len(found)} .gguf files ({', '.join(q.name for q in found)}) and no "
                               "config.json: name the one to import (a split GGUF must be merged first, "
                               "llama-gguf-split --merge)")
    return found[0] if found else None


def architectures() -> dict[str, object]:
    """llama.cpp architecture name → family module, for the families with a GGUF table."""
    from .families import family_modules

    return {fam.GGUF.name: fam for fam in family_modules() if getattr(fam, "GGUF", None) is not None}


def _scalar(value):
    return value.item() if isinstance(value, np.generic) else value


class GGUFFile:
    """A GGUF's metadata (key → Python value) and tensor table, read through the gguf package."""

    def __init__(self, path: Path):
        try:
            import gguf
        except ImportError as e:  # a dependency of edgemoe; say what is missing rather than fail obscurely
            raise ModelImportError(f"reading {path} needs the gguf package (pip install gguf)") from e
        self.path = Path(path)
        try:
            self.reader = gguf.GGUFReader(str(path))
        except (ValueError, OSError, KeyError, IndexError, TypeError, OverflowError) as e:
            raise ModelImportError(f"{path}: not a readable GGUF file ({e})") from e
        self.fields = {name: f for name, f in self.reader.fields.items() if not name.startswith("GGUF.")}
        self.tensors = {t.name: t for t in self.reader.tensors}

    def value(self, key: str):
        f = self.fields.get(key)
        if f is None:
            return None
        v = f.contents()
        return [_scalar(x) for x in v] if isinstance(v, list) else _scalar(v)

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape in NumPy order (ggml's ne reversed: [rows, columns] for a matrix)."""
        return tuple(int(d) for d in reversed(self.tensors[name].shape.tolist()))


class MetadataReader:
    """The GGUF's ``{arch}.*`` keys, each taken at most once by the importer; `done()` refuses the
    rest, and any key outside ``{arch}.*`` and the inert prefixes."""

    def __init__(self, f: GGUFFile, arch: str, label: str):
        self.f, self.arch, self.label, self.used = f, arch, label, set()

    def _key(self, key: str) -> str:
        return f"{self.arch}.{key}"

    def get(self, key: str, default=None):
        full = self._key(key)
        self.used.add(full)
        value = self.f.value(full)
        return default if value is None else value

    def integer(self, key: str, default=None, minimum: int = 1) -> int:
        value = self.get(key, default)
        if value is None:
            raise ModelImportError(f"{self.f.path}: {self.label} needs the metadata key {self._key(key)!r}")
        if isinstance(value, list) and value and all(v == value[0] for v in value):
            value = value[0]  # a per-layer array with one value for every layer
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ModelImportError(f"{self.f.path}: {self._key(key)} = {value!r} is not supported for {self.label}: "
                                   f"it must be an integer ≥ {minimum}"
                                   + (" (the same for every layer)" if isinstance(value, list) else ""))
        return value

    def number(self, key: str, default=None) -> float:
        """A float32 metadata value as the decimal it was written from (its shortest round trip)."""
        value = self.get(key, default)
        if value is None:
            raise ModelImportError(f"{self.f.path}: {self.label} needs the metadata key {self._key(key)!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
            raise ModelImportError(f"{self.f.path}: {self._key(key)} = {value!r} is not supported for {self.label}: "
                                   "it must be a finite number")
        if isinstance(value, float) and float(np.float32(value)) == value:  # stored as float32
            return float(str(np.float32(value)))
        return float(value)

    def expect(self, key: str, allowed, what: str = "") -> None:
        """The key, if present, must have one of the values `allowed` (what this importer implements)."""
        value = self.get(key)
        if value is not None and value not in allowed:
            raise ModelImportError(f"{self.f.path}: {self._key(key)} = {value!r} is not supported for {self.label}"
                                   f"{what}; supported: {', '.join(repr(a) for a in allowed)}")

    def done(self) -> None:
        unknown = sorted(k for k in self.f.fields if k not in self.used and not k.startswith(INERT_PREFIXES))
        if unknown:
            raise ModelImportError(f"{self.f.path}: metadata key{'s' if len(unknown) > 1 else ''} "
                                   f"{', '.join(map(repr, unknown))} not understood by the {self.label} GGUF importer; "
                                   "the file may be of another architecture or use an option EdgeMoE does not "
                                   "implement")


class GGUFTensor(FileTensor):
    """A tensor of a GGUF file, read (dequantized to float32) when used: its rows of ggml blocks are
    bytes start…end of the file. It pickles as its address, so a worker process reads its own."""

    def __init__(self, path: Path, name: str, ggml_type: str, shape: tuple[int, ...], start: int, end: int):
        super().__init__(path, name, shape, start, end)
        self.ggml_type = ggml_type

    def _slice(self, shape: tuple[int, ...], start: int, end: int) -> "GGUFTensor":
        return GGUFTensor(self.path, self.name, self.ggml_type, shape, start, end)

    def read(self) -> np.ndarray:
        """The tensor as a new float32 array (its mapped pages released afterwards)."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        m, raw = self._mapped_bytes()
        rows = int(np.prod(self.shape[:-1], dtype=np.int64))
        out = np.array(dequantize(raw.reshape(rows, -1), GGMLQuantizationType[self.ggml_type]),
                       dtype=np.float32).reshape(self.shape)
        del raw
        self._release(m)
        return out

    def level_bounds(self, group: int) -> tuple[int, int] | None:
        return LEVEL_BLOCKS[self.ggml_type][1] if self.ggml_type in LEVEL_BLOCKS and group == BLOCK else None

    def stored_levels(self, group: int) -> tuple[np.ndarray, np.ndarray] | None:
        if self.level_bounds(group) is None:
            return None
        m, raw = self._mapped_bytes()
        nbytes = LEVEL_BLOCKS[self.ggml_type][0]
        blocks = raw.reshape(-1, nbytes)
        scales = blocks[:, :2].copy().view(np.float16).reshape(*self.shape[:-1], -1)
        q = blocks[:, 2:]
        if self.ggml_type == "Q8_0":
            levels = q.view(np.int8)
        else:  # Q4_0: byte j holds weight j in its low nibble and weight j + 16 in its high one; level q - 8
            levels = np.concatenate([q & 0x0F, q >> 4], axis=1).astype(np.int8) - np.int8(8)
        levels = levels.reshape(self.shape).copy()
        del raw, blocks, q
        self._release(m)
        return levels, scales


# ggml's block types that are integer levels times one float16 scale d per BLOCK weights (ggml-common.h):
# type → (bytes per block: d then the codes, (lowest, highest) level). Q8_0: int8 levels, llama.cpp's
# quantizer keeps them in [-127, 127]; Q4_0: 4-bit codes q, levels q - 8.
BLOCK = 32
LEVEL_BLOCKS = {"Q8_0": (34, (-128, 127)), "Q4_0": (18, (-8, 7))}


class GGUFTensors:
    """The GGUF's tensors, dequantized to float32 one at a time (or left in the file, GGUFTensor);
    `done()` refuses a file with tensors the importer did not read."""

    def __init__(self, f: GGUFFile):
        self.f, self._used = f, set()

    def has(self, name: str) -> bool:
        return name in self.f.tensors

    def stored(self, name: str, shape: tuple[int, ...]) -> GGUFTensor:
        """The tensor of exactly `shape`, left in the file (read when used)."""
        t = self._checked(name, shape)
        return GGUFTensor(self.f.path, name, t.tensor_type.name, tuple(shape), int(t.data_offset),
                          int(t.data_offset) + int(t.n_bytes))

    def get(self, name: str, shape: tuple[int, ...], *also: tuple[int, ...]) -> np.ndarray:
        """The tensor as float32 of `shape` (also accepted: the shapes `also`, reshaped to `shape`)."""
        from gguf.quants import dequantize

        t = self._checked(name, shape, *also)
        return np.array(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)

    def _checked(self, name: str, shape: tuple[int, ...], *also: tuple[int, ...]):
        """The reader's tensor `name`, present, of `shape` (or one of `also`) and a type the import
        reads; marked used."""
        if name not in self.f.tensors:
            raise ModelImportError(f"{self.f.path}: tensor {name!r} missing")
        t, have = self.f.tensors[name], self.f.shape(name)
        if have != tuple(shape) and have not in also:
            raise ModelImportError(f"{self.f.path}: tensor {name!r} has shape {have}, the metadata implies "
                                   f"{tuple(shape)}")
        if t.tensor_type.name not in DEQUANTIZED_TYPES:
            raise ModelImportError(f"{self.f.path}: tensor {name!r} is of GGML type {t.tensor_type.name}; supported: "
                                   f"{', '.join(DEQUANTIZED_TYPES)} (requantize it, e.g. llama-quantize "
                                   "--allow-requantize … Q8_0)")
        self._used.add(name)
        return t

    def done(self, label: str) -> None:
        unused = sorted(set(self.f.tensors) - self._used)
        if unused:
            more = f" and {len(unused) - 5} more" if len(unused) > 5 else ""
            raise ModelImportError(f"{self.f.path}: tensor{'s' if len(unused) > 1 else ''} "
                                   f"{', '.join(map(repr, unused[:5]))}{more} not used by the {label} GGUF importer; "
                                   "the file may be of another architecture (their arithmetic would be lost)")


def _open(path: Path) -> tuple[GGUFFile, GGUFArch]:
    f = GGUFFile(path)
    kind = f.value("general.type")
    if kind is not None and kind != "model":
        raise ModelImportError(f"{path}: general.type = {kind!r} is not supported: only a model (not an adapter or "
                               "a projector)")
    count = f.value("split.count")
    if count not in (None, 0, 1):
        raise ModelImportError(f"{path}: one of {count} split GGUF files; merge them first "
                               "(llama-gguf-split --merge) and import the merged file")
    arch = f.value("general.architecture")
    table = architectures()
    if arch not in table:
        raise ModelImportError(f"{path}: unknown GGUF architecture {arch!r}; supported: {', '.join(sorted(table))}")
    return f, table[arch].GGUF


def _describe(f: GGUFFile, spec: GGUFArch) -> MoEConfig:
    m = MetadataReader(f, spec.name, spec.label)
    if "token_embd.weight" not in f.tensors:
        raise ModelImportError(f"{f.path}: tensor 'token_embd.weight' missing")
    vocab, hidden = f.shape("token_embd.weight")
    H = m.integer("embedding_length")
    if H != hidden:
        raise ModelImportError(f"{f.path}: {spec.name}.embedding_length = {H} but token_embd has {hidden} columns")
    declared = m.get("vocab_size")
    tokens = f.value("tokenizer.ggml.tokens")
    for what, n in ((f"{spec.name}.vocab_size", declared), ("tokenizer.ggml.tokens", len(tokens) if tokens else None)):
        if n is not None and n != vocab:
            raise ModelImportError(f"{f.path}: {what} gives {n} tokens but token_embd has {vocab} rows")
    experts = m.get("expert_count")
    if not experts:
        state = "absent" if experts is None else experts
        raise ModelImportError(f"{f.path}: {spec.name}.expert_count is {state}: a dense {spec.name} model, not a "
                               "Mixture of Experts")
    heads = m.integer("attention.head_count")
    head_dim = m.integer("attention.key_length", H // heads)
    m.expect("attention.value_length", [head_dim], " (value heads as wide as key heads)")
    m.expect("rope.dimension_count", [head_dim], " (RoPE over the whole head)")
    m.expect("rope.scaling.type", ["none"], " (only plain RoPE)")
    m.expect("attention.causal", [True])
    m.expect("leading_dense_block_count", [0], " (every layer an MoE layer)")
    m.expect("expert_gating_func", [1], " (a softmax over the router logits)")
    m.expect("expert_weights_norm", [spec.norm_topk_prob], f" (llama.cpp's {spec.name} "
             f"{'renormalises' if spec.norm_topk_prob else 'does not renormalise'} the top-k weights)")
    m.expect("expert_shared_count", [1 if spec.shared_expert else 0])
    dense = m.get("feed_forward_length")  # a dense layer's width; the experts' where no expert width is given
    intermediate = m.integer("expert_feed_forward_length", dense)
    shared = m.integer("expert_shared_feed_forward_length", dense) if spec.shared_expert else 0

    def vocab_ok(key):  # an id outside the vocabulary can never be generated or fed: there is none
        value = f.value(key)
        return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < vocab else None

    cfg = MoEConfig(
        arch=spec.family, vocab_size=vocab, hidden_size=H, num_layers=m.integer("block_count"), num_heads=heads,
        num_kv_heads=m.integer("attention.head_count_kv", heads), head_dim=head_dim,
        num_experts=m.integer("expert_count"), top_k=m.integer("expert_used_count"),
        expert_intermediate=intermediate, max_positions=m.integer("context_length"),
        rope_theta=m.number("rope.freq_base", 10000.0), norm_eps=m.number("attention.layer_norm_rms_epsilon"),
        norm_topk_prob=spec.norm_topk_prob, tie_embeddings="output.weight" not in f.tensors,
        bos_token_id=vocab_ok("tokenizer.ggml.bos_token_id"), eos_token_id=vocab_ok("tokenizer.ggml.eos_token_id"),
        qkv_bias=spec.qkv_bias, qk_norm=spec.qk_norm, shared_expert_intermediate=shared,
        shared_expert_gate=spec.shared_expert)
    if cfg.top_k > cfg.num_experts or cfg.num_heads % cfg.num_kv_heads or head_dim % 2:
        raise ModelImportError(f"{f.path}: inconsistent metadata: {cfg.top_k} of {cfg.num_experts} experts, "
                               f"{heads} heads over {cfg.num_kv_heads} kv heads, head width {head_dim}")
    m.done()
    return cfg


def unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's LlamaModel.permute on a q or k projection (rows, or a bias): ggml's
    interleaved RoPE pairs (2i, 2i+1) of each head back to rotate-half pairs (i, i + d/2)."""
    d = w.shape[0] // heads
    return np.ascontiguousarray(w.reshape(heads, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def _experts(r: GGUFTensors, p: str, E: int, I: int, H: int) -> list[Expert]:
    """Layer prefix p's experts from the stacked ffn_{gate,up,down}_exps [E, …], or the older
    per-expert ffn_{gate,up,down}.E tensors; left in the file (GGUFTensor), read when used."""
    shapes = {"gate": (I, H), "up": (I, H), "down": (H, I)}
    mats = {}
    for kind, shape in shapes.items():
        stacked = f"{p}ffn_{kind}_exps.weight"
        if r.has(stacked) or not r.has(f"{p}ffn_{kind}.0.weight"):
            w = r.stored(stacked, (E, *shape))
            mats[kind] = [w.row(e) for e in range(E)]
        else:
            mats[kind] = [r.stored(f"{p}ffn_{kind}.{e}.weight", shape) for e in range(E)]
    return [Expert(mats["gate"][e], mats["up"][e], mats["down"][e]) for e in range(E)]


def _layer(r: GGUFTensors, cfg: MoEConfig, spec: GGUFArch, i: int) -> Layer:
    H, q, kv, E, I = cfg.hidden_size, cfg.q_dim, cfg.kv_dim, cfg.num_experts, cfg.expert_intermediate
    p = f"blk.{i}."
    layer = Layer(attn_norm=r.get(p + "attn_norm.weight", (H,)), ffn_norm=r.get(p + "ffn_norm.weight", (H,)),
                  wq=r.stored(p + "attn_q.weight", (q, H)), wk=r.stored(p + "attn_k.weight", (kv, H)),
                  wv=r.stored(p + "attn_v.weight", (kv, H)), wo=r.stored(p + "attn_output.weight", (H, q)),
                  router=r.get(p + "ffn_gate_inp.weight", (E, H)), experts=_experts(r, p, E, I, H))
    if cfg.qkv_bias:
        layer.bq, layer.bk, layer.bv = (r.get(p + "attn_q.bias", (q,)), r.get(p + "attn_k.bias", (kv,)),
                                        r.get(p + "attn_v.bias", (kv,)))
    if cfg.qk_norm != "none":
        d = cfg.head_dim
        shapes = ((d,), (d,)) if cfg.qk_norm == "head" else ((q,), (kv,))
        layer.q_norm = r.get(p + "attn_q_norm.weight", shapes[0])
        layer.k_norm = r.get(p + "attn_k_norm.weight", shapes[1])
    if spec.shared_expert:
        S = cfg.shared_expert_intermediate
        layer.shared = Expert(r.stored(p + "ffn_gate_shexp.weight", (S, H)),
                              r.stored(p + "ffn_up_shexp.weight", (S, H)), r.stored(p + "ffn_down_shexp.weight", (H, S)))
        layer.shared_gate = r.get(p + "ffn_gate_inp_shexp.weight", (1, H), (H,))
    if spec.permuted_qk:  # rows reordered as they are read (the blocks of a row stay whole)
        layer.wq = RowOrder(layer.wq, unpermute_rows(np.arange(q), cfg.num_heads))
        layer.wk = RowOrder(layer.wk, unpermute_rows(np.arange(kv), cfg.num_kv_heads))
        if layer.bq is not None:
            layer.bq, layer.bk = unpermute_rows(layer.bq, cfg.num_heads), unpermute_rows(layer.bk, cfg.num_kv_heads)
    return layer


def describe_gguf(path: str | Path) -> MoEConfig:
    """The MoEConfig of a GGUF file from its metadata and tensor table (no tensor data read)."""
    f, spec = _open(Path(path))
    return _describe(f, spec)


def load_gguf(path: str | Path) -> MoEModel:
    """Import a GGUF file into the project's MoEModel, strictly: its matrices as GGUFTensors (read when
    used; models.read_stored reads them; llama's q/k as RowOrders of them), its vectors and routers as
    float32."""
    f, spec = _open(Path(path))
    cfg = _describe(f, spec)
    r = GGUFTensors(f)
    V, H = cfg.vocab_size, cfg.hidden_size
    embed = r.stored("token_embd.weight", (V, H))
    layers = [_layer(r, cfg, spec, i) for i in range(cfg.num_layers)]
    final_norm = r.get("output_norm.weight", (H,))
    lm_head = embed if cfg.tie_embeddings else r.stored("output.weight", (V, H))
    r.done(spec.label)
    return MoEModel(cfg, embed, layers, final_norm, lm_head)


@dataclass
class GGUFVocabulary:
    """The tokenizer a GGUF carries (``tokenizer.ggml.*``), as stored (tokenizer_files converts it)."""

    model: str | None  # "gpt2" (byte-level BPE), "llama" (SentencePiece), …
    pre: str | None  # llama.cpp's pre-tokenizer name ("qwen2", "olmo", …)
    tokens: list[str] = field(default_factory=list)
    token_types: list[int] = field(default_factory=list)  # 1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte
    merges: list[str] = field(default_factory=list)  # BPE merges "a b", in rank order
    scores: list[float] = field(default_factory=list)  # SentencePiece scores
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    add_bos_token: bool | None = None
    chat_template: str | None = None  # tokenizer.chat_template (Jinja, as in tokenizer_config.json)


def read_vocabulary(path: str | Path) -> GGUFVocabulary | None:
    """The vocabulary of the GGUF at `path` (a file or a directory load_model would read it from),
    or None when it carries none."""
    f = GGUFFile(gguf_file(path) or Path(path))

    def v(key, default=None):
        value = f.value("tokenizer.ggml." + key)
        return default if value is None else value

    if v("tokens") is None:
        return None
    return GGUFVocabulary(model=v("model"), pre=v("pre"), tokens=v("tokens"), token_types=v("token_type", []),
                          merges=v("merges", []), scores=v("scores", []), bos_token_id=v("bos_token_id"),
                          eos_token_id=v("eos_token_id"), add_bos_token=v("add_bos_token"),
                          chat_template=f.value("tokenizer.chat_template"))


# llama.cpp pre-tokenizer names whose split is GPT-2's regex (what a ByteLevel pre-tokenizer does)
GPT2_SPLIT_PRE = (None, "default", "gpt-2", "olmo")


def tokenizer_files(vocab: GGUFVocabulary) -> tuple[str, str] | str:
    """(tokenizer.json, tokenizer_config.json) equivalent to a GGUF's byte-level BPE vocabulary with
    GPT-2's split, or the reason it cannot be converted (SentencePiece vocabularies, other splits)."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    if vocab.model != "gpt2":
        return f"its vocabulary is {vocab.model!r}, not byte-level BPE ('gpt2')"
    if vocab.pre not in GPT2_SPLIT_PRE:
        return f"its pre-tokenizer {vocab.pre!r} splits text otherwise than GPT-2's"
    ids = {t: i for i, t in enumerate(vocab.tokens)}
    merges = [tuple(m.split(" ", 1)) for m in vocab.merges]
    try:
        tok = Tokenizer(models.BPE(vocab=ids, merges=merges))
    except Exception as e:  # noqa: BLE001 - tokenizers reports a bad vocabulary as a plain Exception
        return f"its vocabulary is inconsistent ({e})"
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    control = [vocab.tokens[i] for i, kind in enumerate(vocab.token_types) if kind == 3]
    tok.add_special_tokens(control)
    config = {"bos_token": None if vocab.bos_token_id is None else vocab.tokens[vocab.bos_token_id],
              "eos_token": None if vocab.eos_token_id is None else vocab.tokens[vocab.eos_token_id]}
    if vocab.chat_template:
        config["chat_template"] = vocab.chat_template
    return tok.to_str(), json.dumps(config, indent=2)


__all__ = ["GGUFArch", "GGUFVocabulary", "gguf_file", "load_gguf", "describe_gguf", "read_vocabulary", "tokenizer_files",
           "unpermute_rows", "architectures", "DEQUANTIZED_TYPES"]
