"""Reading an ONNX export of a supported family strictly into the same MoEModel the Hugging Face
importers produce: the graph is parsed, its blocks recognised, and every weight placed by its role
in the graph.

Which files: ``load_model(path)`` takes an ONNX model when ``path`` ends in ``.onnx``, or is a
directory holding exactly one ``*.onnx`` file and no ``*.safetensors`` (what optimum and
``edgemoe.onnx_reference.export`` write: model.onnx, its external data, config.json). Beside the
.onnx must lie the Hugging Face ``config.json`` of the checkpoint it was exported from: the graph
does not carry the hyper-parameters (ε, θ, the family), and the family's own reading of it
(``describe`` in ``models/families/``) gives the MoEConfig; the graph is then checked against it.

Which exports: torch.onnx's (the dynamo exporter, ``torch.onnx.export(..., dynamo=True)``) of a
``transformers`` causal LM mapping token ids [batch, sequence] to logits, with the experts run as
batched matmuls (``set_experts_implementation("batched_mm")``): no KV-cache inputs, no other
inputs. Which families: those whose every block the reader below recognises, ``FAMILIES``
(Mixtral, Qwen2-MoE with its gated shared expert and q/k/v biases, Qwen3-MoE with per-head q/k
norms, OLMoE with whole-projection q/k norms); any other family is refused by name.

How the graph is read: from the token ids' embedding ``Gather`` along the residual stream. At each
stream value an RMSNorm (Pow 2, ReduceMean, Add ε, Sqrt, Reciprocal, Mul, Mul by its weight)
and a residual ``Add`` follow; the nodes between the norm's output and the Add's other operand
are the block. An attention block holds q, k and v projections of the norm's output, one
Softmax between a scores MatMul and a context MatMul, and an output projection: q is the
projection the scores' first operand comes from, k the second's, v the context's; a bias is an
``Add`` of a vector right after a projection, a q/k norm an RMSNorm on its path. A feed-forward
block with a ``TopK`` is an MoE block: router (MatMul or Gemm) → Softmax → TopK (k checked
against ``num_experts_per_tok``; a ReduceSum and Div of the top-k values is renormalisation,
checked against the config), the experts' stacked weights ``[E, 2I, H]`` (gate rows, then up
rows: the Split half feeding the Sigmoid is the gate) and ``[E, H, I]`` gathered by expert id
into batched MatMuls, and a shared SwiGLU MLP scaled by sigmoid of its own one-row projection
where the family has one; one without TopK is a dense SwiGLU MLP. After the last layer comes the
final RMSNorm and the LM head, whose output is the graph's. The number of layers, their kinds
(MoE or dense), every weight's shape, ε of every norm, the attention's scale, RoPE's frequencies
(θ) and the router's k are compared with the config; a mismatch is refused naming both.

Strict, as ``hf_import`` is: an operator outside those these exports use, a weight (a float
initializer of more than one element) no role takes, or a float scalar constant that is not part
of a recognised pattern (ε, an exponent, the attention scale, a selection in a ``Where``) is
refused naming it and the module torch.onnx recorded for its node. Integer constants (shapes,
axes, indices) are not checked beyond the TopK's k.

Weights: initializers in external data files (torch.onnx writes them for models over 2 GB, and
``export`` always) are read lazily as StoredTensors of their byte ranges (models/stored_tensor.py),
the experts one at a time when the compiler rounds them; F32, F16 and BF16 are imported. A
MatMul's weight is [in, out] and is transposed to the project's [out, in] when read; a Gemm's
with transB is taken as it is.

Tokenizer: a ``tokenizer.json`` (and ``tokenizer_config.json``) beside the .onnx is placed in the
artifact as an HF directory's is (compiler/driver.py place_tokenizer); else token ids.
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import Expert, Layer, MoEConfig, MoEModel
from .hf_import import ModelImportError
from .stored_tensor import STORED_DTYPES, StoredTensor, materialize

SUFFIX = ".onnx"
# The families whose blocks the graph reader recognises (MoEConfig.arch)
FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
# ONNX TensorProto data types of weights → StoredTensor's dtype names
WEIGHT_TYPES = {1: "F32", 10: "F16", 16: "BF16"}
# The operators torch.onnx writes for these families' decoders (default domain): the rest are refused
OPERATORS = frozenset({
    "Add", "And", "Cast", "Concat", "Constant", "Cos", "CumSum", "Div", "Equal", "Expand", "Gather", "GatherND",
    "Gemm", "IsNaN", "LessOrEqual", "MatMul", "Max", "Mul", "Neg", "Not", "Pow", "Range", "Reciprocal",
    "ReduceMean", "ReduceSum", "Reshape", "Shape", "Sigmoid", "Sin", "Slice", "Softmax", "Split", "Sqrt", "Squeeze",
    "Sub", "TopK", "Transpose", "Unsqueeze", "Where"})
EXPORT_HINT = ("export logits from input_ids alone with torch.onnx's dynamo exporter and the experts as batched "
               "matmuls (edgemoe.onnx_reference.export)")


def onnx_file(path: str | Path) -> Path | None:
    """The ONNX file `path` names — itself if it ends in .onnx, the single .onnx of a directory
    without *.safetensors — or None when `path` is not an ONNX model."""
    p = Path(path)
    if p.suffix.lower() == SUFFIX:
        if not p.is_file():
            raise ModelImportError(f"{p} not found (or not a file)")
        return p
    if not p.is_dir() or any(p.glob("*.safetensors")):
        return None
    found = sorted(q for q in p.iterdir() if q.suffix.lower() == SUFFIX and q.is_file())
    if len(found) > 1:
        raise ModelImportError(f"{p} holds {len(found)} .onnx files ({', '.join(q.name for q in found)}): name the "
                               "one to import")
    return found[0] if found else None


def _read_config(path: Path) -> dict:
    where = path.parent / "config.json"
    if not where.is_file():
        raise ModelImportError(f"{where} not found: an ONNX model needs beside it the Hugging Face config.json of the "
                               "checkpoint it was exported from (save_pretrained's, as optimum writes it)")
    try:
        return json.loads(where.read_text())
    except ValueError as e:
        raise ModelImportError(f"{where}: not readable JSON ({e})") from None


def _family(path: Path, hf: dict):
    """The family module config.json's architectures name, if the ONNX importer reads that family."""
    from . import IMPORTERS

    readable = {a: fam for a, fam in IMPORTERS.items() if fam.__name__.rsplit(".", 1)[1] in FAMILIES}
    archs = hf.get("architectures") or []
    fam = next((readable[a] for a in archs if a in readable), None)
    if fam is None:
        raise ModelImportError(f"{path}: the ONNX importer does not read {archs or hf.get('model_type')!r} models "
                               f"(config.json beside it); supported: {', '.join(sorted(readable))}")
    return fam


def describe_onnx(path: str | Path) -> MoEConfig:
    """The MoEConfig of an ONNX export from the config.json beside it (the graph is not read)."""
    path = Path(path)
    hf = _read_config(path)
    return _family(path, hf).describe(hf, path.parent)


@dataclass
class Linear:
    """A MatMul or Gemm by a weight initializer: its node, input, output and weight [out, in]."""

    node: int
    x: str
    out: str
    name: str
    weight: object  # StoredTensor or ndarray [out, in]


class OnnxGraph:
    """An ONNX model's graph (external data not loaded): nodes, who produces and consumes each value,
    the initializers; weights read lazily."""

    def __init__(self, path: Path):
        try:
            import onnx
        except ImportError as e:  # say what is missing rather than fail obscurely
            raise ModelImportError(f"reading {path} needs the onnx package (pip install onnx)") from e
        self.path = path
        try:
            self.model = onnx.load(str(path), load_external_data=False)
        except Exception as e:  # noqa: BLE001 - protobuf reports a damaged file with its own exception types
            raise ModelImportError(f"{path}: not a readable ONNX file ({type(e).__name__}: {e}); a truncated or "
                                   "damaged file: export it again") from None
        g = self.model.graph
        if not g.node:
            raise ModelImportError(f"{path}: the ONNX graph is empty (a truncated or damaged file?)")
        self.nodes = list(g.node)
        self.inits = {t.name: t for t in g.initializer}
        for t in g.initializer:
            kind = onnx.TensorProto.DataType.Name(t.data_type)
            if kind.startswith(("FLOAT", "DOUBLE", "BFLOAT")) and t.data_type not in WEIGHT_TYPES:
                raise ModelImportError(f"{path}: initializer {t.name!r} is {kind}; the ONNX importer reads float32, "
                                       "float16 and bfloat16 weights (export the model in one of them)")
        self.producer, self.consumers = {}, defaultdict(list)
        for i, n in enumerate(self.nodes):
            if n.domain not in ("", "ai.onnx") or n.op_type not in OPERATORS:
                raise ModelImportError(f"{path}: operator {n.domain + '::' if n.domain else ''}{n.op_type} (node "
                                       f"{n.name!r} in {self.scope(i)}) is not one the ONNX importer recognises; "
                                       f"{EXPORT_HINT}")
            for o in n.output:
                self.producer[o] = i
            for x in n.input:
                if x:
                    self.consumers[x].append(i)
        self.claimed: set[str] = set()

    def scope(self, i: int) -> str:
        """The module torch.onnx recorded for node i (its name scopes), or the node's name."""
        meta = {p.key: p.value for p in self.nodes[i].metadata_props}
        scopes = meta.get("pkg.torch.onnx.name_scopes")
        if scopes:
            try:
                names = [s for s in json.loads(scopes.replace("'", '"')) if s]
                return names[-2] if len(names) > 1 else names[-1]
            except (ValueError, IndexError):
                pass
        return self.nodes[i].name or f"node {i}"

    def fail(self, i: int, what: str):
        n = self.nodes[i]
        raise ModelImportError(f"{self.path}: {what} ({n.op_type} node {n.name!r} in {self.scope(i)}); the graph is not "
                               f"the export of a family the importer recognises: {EXPORT_HINT}")

    # values
    def const(self, name: str) -> np.ndarray | None:
        """A constant's value (an initializer or a Constant node's), or None for a computed value."""
        from onnx import numpy_helper

        if name in self.inits:
            t = self.inits[name]
            return materialize(self.tensor(name)) if t.data_type in WEIGHT_TYPES else numpy_helper.to_array(t)
        i = self.producer.get(name)
        if i is not None and self.nodes[i].op_type == "Constant":
            for a in self.nodes[i].attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
        return None

    def scalar(self, name: str) -> float | None:
        """A float constant of one element, or None."""
        if name in self.inits and int(np.prod(self.inits[name].dims, dtype=np.int64)) != 1:
            return None
        v = self.const(name)
        return float(v.reshape(-1)[0]) if v is not None and v.size == 1 and v.dtype.kind == "f" else None

    def is_weight(self, name: str) -> bool:
        t = self.inits.get(name)
        return t is not None and t.data_type in WEIGHT_TYPES and int(np.prod(t.dims, dtype=np.int64)) > 1

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self.inits[name].dims)

    def tensor(self, name: str):
        """A float initializer: a StoredTensor of its external data's byte range, or an array when inline."""
        from onnx import TensorProto, numpy_helper

        t = self.inits[name]
        dtype, shape = WEIGHT_TYPES[t.data_type], self.shape(name)
        if t.data_location != TensorProto.EXTERNAL:  # inline: small, read now
            return numpy_helper.to_array(t).astype(np.float32)
        info = {e.key: e.value for e in t.external_data}
        location = Path(info.get("location", ""))
        if not info.get("location") or location.is_absolute() or ".." in location.parts:
            raise ModelImportError(f"{self.path}: initializer {name!r} names external data {str(location)!r}: only a "
                                   "file beside the .onnx is read")
        data = self.path.parent / location
        start = int(info.get("offset", 0))
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(STORED_DTYPES[dtype]).itemsize
        end = start + int(info.get("length", size))
        if end - start != size:
            raise ModelImportError(f"{self.path}: initializer {name!r} spans {end - start} bytes of {location}; its "
                                   f"shape {shape} at {dtype} needs {size} (a damaged file: export it again)")
        if not data.is_file() or data.stat().st_size < end:
            state = "missing" if not data.is_file() else f"{data.stat().st_size} bytes long"
            raise ModelImportError(f"{self.path}: initializer {name!r} lies at bytes {start}…{end} of {data}, which is "
                                   f"{state} (a truncated or missing external data file: copy it beside the .onnx)")
        return StoredTensor(data, name, dtype, shape, start, end)

    # structure
    def users(self, value: str, op: str | None = None, within=None) -> list[int]:
        return [i for i in self.consumers.get(value, ()) if (op is None or self.nodes[i].op_type == op)
                and (within is None or i in within)]

    def other(self, i: int, value: str) -> str:
        """The other input of binary node i."""
        a, b = self.nodes[i].input
        return b if a == value else a

    def cone(self, start: str, end: str) -> list[int]:
        """The nodes on a path from value `start` to value `end`, in graph order."""
        fwd, todo = set(), [start]
        while todo:
            for i in self.consumers.get(todo.pop(), ()):
                if i not in fwd:
                    fwd.add(i)
                    todo.extend(self.nodes[i].output)
        return sorted(fwd & self.ancestors(end))

    def ancestors(self, value: str, within=None) -> set[int]:
        seen, todo = set(), [value]
        while todo:
            i = self.producer.get(todo.pop())
            if i is not None and i not in seen and (within is None or i in within):
                seen.add(i)
                todo.extend(x for x in self.nodes[i].input if x)
        return seen

    def linear(self, i: int) -> Linear | None:
        """Node i as a Linear if it multiplies a value by a 2-D weight initializer."""
        n = self.nodes[i]
        if n.op_type == "MatMul" and self.is_weight(n.input[1]) and len(self.shape(n.input[1])) == 2:
            self.claimed.add(n.input[1])
            w = self.tensor(n.input[1])
            return Linear(i, n.input[0], n.output[0], n.input[1], np.ascontiguousarray(materialize(w).T))
        if n.op_type == "Gemm" and self.is_weight(n.input[1]):
            attrs = {a.name: (a.i if a.type == 2 else a.f) for a in n.attribute}
            if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or len(n.input) > 2:
                self.fail(i, "a Gemm with transA, a scale alpha or a bias C")
            self.claimed.add(n.input[1])
            w = self.tensor(n.input[1])
            return Linear(i, n.input[0], n.output[0], n.input[1],
                          w if attrs.get("transB", 0) else np.ascontiguousarray(materialize(w).T))
        return None

    def through(self, value: str, ops=("Reshape",), within=None) -> str:
        """`value` followed through single-consumer shape ops."""
        while True:
            us = self.users(value, within=within)
            if len(us) != 1 or self.nodes[us[0]].op_type not in ops:
                return value
            value = self.nodes[us[0]].output[0]

    def source(self, value: str, ops=("Reshape", "Squeeze", "Unsqueeze")) -> str:
        """`value` traced back through shape ops to where it was computed."""
        while (i := self.producer.get(value)) is not None and self.nodes[i].op_type in ops:
            value = self.nodes[i].input[0]
        return value


@dataclass
class Norm:
    """A recognised RMSNorm: its output value, weight, ε and nodes."""

    out: str
    weight: object
    eps: float
    nodes: tuple[int, ...]


def _rmsnorm(g: OnnxGraph, x: str, within=None) -> Norm | None:
    """The RMSNorm of value x (Pow 2 → ReduceMean → Add ε → Sqrt → Reciprocal → Mul x → Mul weight), or
    None when no Pow reads x; a Pow that starts another pattern is refused."""
    pows = g.users(x, "Pow", within)
    if not pows:
        return None
    p = pows[0]

    def one(value, op, what):
        us = g.users(value, op)
        if len(us) != 1:
            g.fail(p, f"an RMSNorm expected: {what} missing after it")
        return us[0]

    if g.scalar(g.nodes[p].input[1]) != 2.0:
        g.fail(p, "an RMSNorm expected: its Pow's exponent is not 2")
    mean = one(g.nodes[p].output[0], "ReduceMean", "ReduceMean")
    m = g.nodes[mean]
    axes = g.const(m.input[1]) if len(m.input) > 1 else \
        next((list(a.ints) for a in m.attribute if a.name == "axes"), None)
    if axes is None or list(np.reshape(axes, -1)) != [-1]:
        g.fail(mean, "an RMSNorm expected: its mean is not over the last axis")
    add = one(g.nodes[mean].output[0], "Add", "Add ε")
    eps = g.scalar(g.other(add, g.nodes[mean].output[0]))
    if eps is None:
        g.fail(add, "an RMSNorm expected: ε is not a constant")
    sqrt = one(g.nodes[add].output[0], "Sqrt", "Sqrt")
    rec = one(g.nodes[sqrt].output[0], "Reciprocal", "Reciprocal")
    mul = [i for i in g.users(g.nodes[rec].output[0], "Mul") if g.other(i, g.nodes[rec].output[0]) == x]
    if len(mul) != 1:
        g.fail(rec, "an RMSNorm expected: x · rsqrt missing")
    scaled = g.nodes[mul[0]].output[0]
    wmul = g.users(scaled, "Mul")
    weight = g.other(wmul[0], scaled) if len(wmul) == 1 else None
    if weight is None or not g.is_weight(weight) or len(g.shape(weight)) != 1:
        g.fail(mul[0], "an RMSNorm expected: no weight vector multiplies it")
    g.claimed.update((weight, g.nodes[p].input[1], g.other(add, g.nodes[mean].output[0])))
    return Norm(g.nodes[wmul[0]].output[0], g.tensor(weight), eps, (p, mean, add, sqrt, rec, mul[0], wmul[0]))


def _gate_and_up(gate_up, e: int, inter: int):
    """Expert e's gate rows and up rows of a stacked gate-up weight [E, 2I, H], unread where stored."""
    if isinstance(gate_up, StoredTensor):
        rows = gate_up.row(e)
        return rows.rows(0, inter), rows.rows(inter, 2 * inter)
    return np.ascontiguousarray(gate_up[e, :inter]), np.ascontiguousarray(gate_up[e, inter:])


class _Reader:
    """The walk along the residual stream (module docstring), building the MoEModel of `cfg`."""

    def __init__(self, g: OnnxGraph, cfg: MoEConfig):
        self.g, self.cfg = g, cfg

    def mismatch(self, what: str, graph, config):
        raise ModelImportError(f"{self.g.path}: {what}: the graph has {graph}, config.json beside it implies {config}; "
                               "the config is not the one the model was exported from")

    def shaped(self, lin: Linear, shape: tuple[int, ...], what: str):
        if tuple(lin.weight.shape) != shape:
            self.mismatch(f"{what} ({lin.name})", tuple(lin.weight.shape), shape)
        return lin.weight

    def norm(self, x: str, what: str, shape: tuple[int, ...] | None = None, within=None) -> Norm:
        """The RMSNorm of x, checked against the config (with `shape`; else check() it later)."""
        n = _rmsnorm(self.g, x, within)
        if n is None:
            consumers = self.g.users(x) or [self.g.producer[x]]
            self.g.fail(consumers[0], f"the {what} RMSNorm expected on {x!r}")
        return n if shape is None else self.check(n, what, shape)

    def check(self, n: Norm, what: str, shape: tuple[int, ...]) -> Norm:
        if tuple(n.weight.shape) != shape:
            self.mismatch(f"the {what} norm's weight", tuple(n.weight.shape), shape)
        if np.float32(n.eps) != np.float32(self.cfg.norm_eps):
            self.mismatch(f"the {what} norm's ε", str(np.float32(n.eps)), self.cfg.norm_eps)
        return n

    def bias(self, value: str, within, size: int, what: str):
        """(the bias vector added right after `value`, the sum) or (None, value)."""
        g = self.g
        for i in g.users(value, "Add", within):
            b = g.other(i, value)
            if g.is_weight(b) and len(g.shape(b)) == 1:
                if g.shape(b) != (size,):
                    self.mismatch(f"the {what} bias ({b})", g.shape(b), (size,))
                g.claimed.add(b)
                return g.tensor(b), g.nodes[i].output[0]
        return None, value

    def model(self) -> MoEModel:
        g, cfg = self.g, self.cfg
        inputs = [v.name for v in g.model.graph.input if v.name not in g.inits]
        outputs = [v.name for v in g.model.graph.output]
        if len(inputs) != 1 or len(outputs) != 1:
            raise ModelImportError(f"{g.path}: graph inputs {inputs} and outputs {outputs}: the importer reads a graph "
                                   f"from token ids to logits alone (no attention mask, no KV cache); {EXPORT_HINT}")
        gathers = g.users(inputs[0], "Gather")
        if len(gathers) != 1 or not g.is_weight(g.nodes[gathers[0]].input[0]):
            raise ModelImportError(f"{g.path}: no embedding (a Gather of a weight by {inputs[0]!r}) found; "
                                   f"{EXPORT_HINT}")
        embed_name = g.nodes[gathers[0]].input[0]
        if g.shape(embed_name) != (cfg.vocab_size, cfg.hidden_size):
            self.mismatch(f"the embedding ({embed_name})", g.shape(embed_name), (cfg.vocab_size, cfg.hidden_size))
        g.claimed.add(embed_name)
        embed = g.tensor(embed_name)
        x, layers = g.nodes[gathers[0]].output[0], []
        while True:
            i = len(layers)
            n = self.norm(x, f"layer {i} attention (or the final)")
            residual = self.residual(x, n)
            self.check(n, "final" if residual is None else f"layer {i} attention", (cfg.hidden_size,))
            if residual is None:
                break
            h, attn = self.attention(n, x, residual, i)
            n2 = self.norm(h, f"layer {i} feed-forward", (cfg.hidden_size,))
            residual2 = self.residual(h, n2)
            if residual2 is None:
                g.fail(g.users(h)[0], f"layer {i} has no feed-forward block after its attention")
            x, ffn = self.feed_forward(n2, h, residual2, i)
            layers.append(Layer(attn_norm=n.weight, ffn_norm=n2.weight, **attn, **ffn))
        if len(layers) != cfg.num_layers:
            self.mismatch("the number of decoder layers", len(layers), cfg.num_layers)
        lm = [lin for i in g.users(n.out) if (lin := g.linear(i)) is not None]
        if len(lm) != 1 or lm[0].out != outputs[0]:
            g.fail(g.users(n.out)[0], "the LM head (a MatMul by a [hidden, vocab] weight giving the logits) expected "
                   "after the final norm")
        lm_head = self.shaped(lm[0], (cfg.vocab_size, cfg.hidden_size), "the LM head")
        if cfg.tie_embeddings:
            if not np.array_equal(materialize(lm_head), materialize(embed)):
                self.mismatch("an LM head", "one other than the embedding", "tied embeddings")
            lm_head = embed
        self.rope()
        self.unclaimed()
        return MoEModel(cfg, embed, layers, n.weight, lm_head)

    def residual(self, x: str, n: Norm) -> int | None:
        """The residual Add reading stream value x (beside its norm), or None after the last layer."""
        g = self.g
        rest = [i for i in g.users(x) if i not in n.nodes]
        adds = [i for i in rest if g.nodes[i].op_type == "Add"]
        if len(rest) > 1 or len(rest) != len(adds):
            g.fail(rest[-1], f"the residual stream value {x!r} is read by an operation the importer does not place")
        return adds[0] if adds else None

    def attention(self, n: Norm, x: str, add: int, li: int) -> tuple[str, dict]:
        g, cfg = self.g, self.cfg
        H, q_dim, kv = cfg.hidden_size, cfg.q_dim, cfg.kv_dim
        end = g.other(add, x)
        C = set(g.cone(n.out, end))
        lins = [lin for i in sorted(C) if (lin := g.linear(i)) is not None]
        soft = [i for i in sorted(C) if g.nodes[i].op_type == "Softmax"]
        if len(soft) != 1 or any(g.nodes[i].op_type == "TopK" for i in C):
            g.fail(g.producer[end], f"layer {li}: an attention block expected (one Softmax, no TopK)")
        plain = [i for i in sorted(C) if g.nodes[i].op_type == "MatMul" and all(lin.node != i for lin in lins)]
        scores = [i for i in plain if i in g.ancestors(g.nodes[soft[0]].input[0], C)]
        context = [i for i in plain if soft[0] in g.ancestors(g.nodes[i].output[0], C)]
        if len(scores) != 1 or len(context) != 1 or len(plain) != 2:
            g.fail(soft[0], f"layer {li}: attention expected (scores MatMul → Softmax → context MatMul)")
        s, c = g.nodes[scores[0]], g.nodes[context[0]]
        paths = {"q": g.ancestors(s.input[0], C), "k": g.ancestors(s.input[1], C), "v": g.ancestors(c.input[1], C)}
        proj = {}
        for lin in lins:
            if lin.x == n.out:
                role = [r for r, anc in paths.items() if lin.node in anc]
                if len(role) != 1 or role[0] in proj:
                    g.fail(lin.node, f"layer {li}: a projection of the attention's input that is not one of q, k, v")
                proj[role[0]] = lin
        out = [lin for lin in lins if lin.x != n.out]
        if len(proj) != 3 or len(out) != 1 or context[0] not in g.ancestors(out[0].x, C):
            g.fail(soft[0], f"layer {li}: attention expected with q, k, v projections of the norm and one output "
                   "projection of the context")
        fields = dict(wq=self.shaped(proj["q"], (q_dim, H), f"layer {li} q projection"),
                      wk=self.shaped(proj["k"], (kv, H), f"layer {li} k projection"),
                      wv=self.shaped(proj["v"], (kv, H), f"layer {li} v projection"),
                      wo=self.shaped(out[0], (H, q_dim), f"layer {li} output projection"))
        norms = []
        for role, size in (("q", q_dim), ("k", kv), ("v", kv)):
            b, value = self.bias(proj[role].out, C, size, f"layer {li} {role} projection")
            fields["b" + role] = b
            value = g.through(value, within=C)
            if role == "v" or not g.users(value, "Pow", C):
                continue
            if cfg.qk_norm == "none":
                self.mismatch(f"layer {li}'s attention", f"a {role} norm", "none (qk_norm of the family)")
            norm = self.norm(value, f"layer {li} {role}", (cfg.head_dim,) if cfg.qk_norm == "head" else (size,), C)
            norms.extend(norm.nodes)
            fields[role + "_norm"] = norm.weight
        fields["bo"], o_end = self.bias(out[0].out, C, H, f"layer {li} output projection")
        if (fields["bq"] is not None) != cfg.qkv_bias or (fields["bo"] is not None) != cfg.o_bias:
            self.mismatch(f"layer {li}'s attention biases", "q/k/v " + ("yes" if fields["bq"] is not None else "no") +
                          ", output " + ("yes" if fields["bo"] is not None else "no"),
                          f"q/k/v {'yes' if cfg.qkv_bias else 'no'}, output {'yes' if cfg.o_bias else 'no'}")
        found = [r for r in ("q", "k") if fields.get(r + "_norm") is not None]
        if found != ([] if cfg.qk_norm == "none" else ["q", "k"]):
            self.mismatch(f"layer {li}'s q/k norms", f"norms of {' and '.join(found) or 'neither'}",
                          f"qk_norm {cfg.qk_norm!r}")
        stray = [i for i in C if g.nodes[i].op_type == "Pow" and i not in norms]
        if stray:
            g.fail(stray[0], f"layer {li}: a Pow in the attention that is not a q/k norm the family has")
        if g.through(o_end, within=C) != end:
            g.fail(g.producer[end], f"layer {li}: the attention's output projection does not end the block")
        self.attention_scale(C, scores[0], li)
        return g.nodes[add].output[0], fields

    def attention_scale(self, C: set[int], scores: int, li: int) -> None:
        """The constant factors on the way to the scores must multiply to the family's softmax scale."""
        g, scale = self.g, 1.0
        for i in sorted(g.ancestors(g.nodes[scores].output[0], C)):
            n = g.nodes[i]
            if n.op_type in ("Mul", "Div"):
                for x in n.input:
                    if (v := g.scalar(x)) is not None:
                        scale *= v if n.op_type == "Mul" else 1.0 / v
                        g.claimed.add(x)
        if not np.isclose(scale, self.cfg.softmax_scale, rtol=1e-5):
            self.mismatch(f"layer {li}'s attention scale", scale, self.cfg.softmax_scale)

    def feed_forward(self, n: Norm, h: str, add: int, li: int) -> tuple[str, dict]:
        g, cfg = self.g, self.cfg
        end = g.other(add, h)
        C = set(g.cone(n.out, end))
        topk = [i for i in sorted(C) if g.nodes[i].op_type == "TopK"]
        dense = li in cfg.dense_layers
        if bool(topk) == dense:
            self.mismatch(f"layer {li}", "an MoE block" if topk else "a dense MLP",
                          "a dense MLP" if dense else "an MoE block")
        lins = [lin for i in sorted(C) if (lin := g.linear(i)) is not None]
        if dense:
            if len(lins) != 3:
                g.fail(lins[0].node if lins else g.producer[end], f"layer {li}: a dense MLP of three projections "
                       f"expected, {len(lins)} found")
            gate, up, down = self.swiglu(lins, C, li, "dense MLP")
            I, H = cfg.dense_intermediate, cfg.hidden_size
            return g.nodes[add].output[0], dict(router=None, dense=Expert(
                self.shaped(gate, (I, H), f"layer {li} MLP gate"), self.shaped(up, (I, H), f"layer {li} MLP up"),
                self.shaped(down, (H, I), f"layer {li} MLP down")))
        return g.nodes[add].output[0], self.moe(C, lins, topk, li)

    def swiglu(self, lins: list[Linear], C: set[int], li: int, what: str) -> tuple[Linear, Linear, Linear]:
        """The gate, up and down projections of a SwiGLU MLP among `lins`: down(silu(gate x) · up x)."""
        g = self.g
        for gate in lins:
            sig = g.users(gate.out, "Sigmoid", C)
            silu = [i for i in g.users(gate.out, "Mul", C) if sig and g.other(i, gate.out) == g.nodes[sig[0]].output[0]]
            if not silu:
                continue
            s = g.nodes[silu[0]].output[0]
            for prod in g.users(s, "Mul", C):
                up = [u for u in lins if u.out == g.other(prod, s) and u.x == gate.x]
                down = [d for d in lins if g.source(d.x) == g.nodes[prod].output[0]]
                if up and down:
                    return gate, up[0], down[0]
        g.fail(lins[0].node if lins else sorted(C)[0], f"layer {li}: a SwiGLU {what} expected "
               "(down(silu(gate x) · up x))")

    def moe(self, C: set[int], lins: list[Linear], topk: list[int], li: int) -> dict:
        g, cfg = self.g, self.cfg
        H, E, I = cfg.hidden_size, cfg.num_experts, cfg.expert_intermediate
        if len(topk) != 1:
            g.fail(topk[1], f"layer {li}: one TopK per MoE block expected")
        t = g.nodes[topk[0]]
        soft = g.producer.get(t.input[0])
        router = [lin for lin in lins if soft is not None and g.nodes[soft].op_type == "Softmax"
                  and lin.out == g.nodes[soft].input[0]]
        if not router:
            g.fail(topk[0], f"layer {li}: the routing expected as router → Softmax → TopK "
                   f"(the {cfg.routing!r} routing of the family)")
        k = g.const(t.input[1])
        if k is None or int(k.reshape(-1)[0]) != cfg.top_k:
            self.mismatch(f"layer {li}'s TopK k", None if k is None else int(k.reshape(-1)[0]),
                          f"num_experts_per_tok = {cfg.top_k}")
        largest = {a.name: a.i for a in t.attribute}.get("largest", 1)
        if not largest:
            g.fail(topk[0], f"layer {li}: a TopK of the smallest values")
        weights = t.output[0]
        sums = g.users(weights, "ReduceSum", C)
        divs = [i for i in g.users(weights, "Div", C) if sums and g.nodes[i].input[1] == g.nodes[sums[0]].output[0]]
        if bool(divs) != cfg.norm_topk_prob:
            self.mismatch(f"layer {li}'s routing", "top-k weights renormalised" if divs else "top-k weights as they are",
                          f"norm_topk_prob = {cfg.norm_topk_prob}")
        gate_up, down = self.experts(C, t.output[1], li)
        if gate_up.shape[0] != E or down.shape[0] != E:
            self.mismatch(f"layer {li}'s expert count", gate_up.shape[0], f"num_experts = {E}")
        if gate_up.shape != (E, 2 * I, H) or down.shape != (E, H, I):
            self.mismatch(f"layer {li}'s expert weights", f"{gate_up.shape} and {down.shape}",
                          f"{(E, 2 * I, H)} and {(E, H, I)}")
        fields = dict(router=self.shaped(router[0], (E, H), f"layer {li} router"),
                      experts=[Expert(*_gate_and_up(gate_up, e, I), down[e]) for e in range(E)])
        rest = [lin for lin in lins if lin is not router[0]]
        if cfg.shared_expert_intermediate:
            S = cfg.shared_expert_intermediate
            sgate = [lin for lin in rest if lin.weight.shape[0] == 1]
            mlp = [lin for lin in rest if lin not in sgate]
            gate, up, down_s = self.swiglu(mlp, C, li, "shared expert")
            fields["shared"] = Expert(self.shaped(gate, (S, H), f"layer {li} shared expert gate"),
                                      self.shaped(up, (S, H), f"layer {li} shared expert up"),
                                      self.shaped(down_s, (H, S), f"layer {li} shared expert down"))
            if cfg.shared_expert_gate:
                if len(sgate) != 1:
                    self.mismatch(f"layer {li}'s shared expert gate", f"{len(sgate)} one-row projections", 1)
                sig = g.users(sgate[0].out, "Sigmoid", C)
                scaled = sig and [i for i in g.users(g.nodes[sig[0]].output[0], "Mul", C)
                                  if g.other(i, g.nodes[sig[0]].output[0]) == down_s.out]
                if not scaled:
                    g.fail(sgate[0].node, f"layer {li}: the shared expert gate expected as sigmoid(w · x) · shared(x)")
                fields["shared_gate"] = self.shaped(sgate[0], (1, H), f"layer {li} shared expert gate")
                rest = [lin for lin in rest if lin is not sgate[0]]
            rest = [lin for lin in rest if lin not in (gate, up, down_s)]
        if rest:
            g.fail(rest[0].node, f"layer {li}: a projection in the MoE block the family does not have")
        return fields

    def experts(self, C: set[int], chosen: str, li: int):
        """The stacked expert weights gathered by expert id: gate-up [E, 2I, H] (its Split's first half
        feeding the Sigmoid) and down [E, H, I] (fed by the gated product)."""
        g = self.g
        stacked = [i for i in sorted(C) if g.nodes[i].op_type in ("GatherND", "Gather")
                   and g.is_weight(g.nodes[i].input[0]) and len(g.shape(g.nodes[i].input[0])) == 3]
        found = {}
        for i in stacked:
            if g.producer[chosen] not in g.ancestors(g.nodes[i].input[1], C):
                g.fail(i, f"layer {li}: expert weights gathered by something other than the TopK's expert ids")
            bmm = g.users(g.nodes[i].output[0], "MatMul", C)
            if len(bmm) != 1:
                g.fail(i, f"layer {li}: gathered expert weights not multiplied (batched MatMul) by the tokens")
            split = g.users(g.through(g.nodes[bmm[0]].output[0], ("Squeeze", "Reshape"), C), "Split", C)
            if split:
                halves = g.nodes[split[0]].output
                if len(halves) != 2 or not g.users(halves[0], "Sigmoid", C) or g.users(halves[1], "Sigmoid", C):
                    g.fail(split[0], f"layer {li}: the experts' gate-up output expected split into gate (through "
                           "SiLU) then up")
                found.setdefault("gate_up", []).append((i, halves))
            else:
                found.setdefault("down", []).append((i, bmm[0]))
        if len(found.get("gate_up", ())) != 1 or len(found.get("down", ())) != 1:
            g.fail(stacked[0] if stacked else sorted(C)[0],
                   f"layer {li}: the experts expected as one stacked gate-up [E, 2I, H] and one down [E, H, I] weight "
                   "gathered by expert id (transformers' batched_mm experts)")
        (gu, (gate_h, up_h)), (dn, dmm) = found["gate_up"][0], found["down"][0]
        tokens = g.ancestors(g.nodes[dmm].input[1], C)
        if not any(g.nodes[j].op_type == "Sigmoid" and g.nodes[j].input[0] == gate_h for j in tokens) or \
                g.producer.get(up_h) not in tokens:
            g.fail(dmm, f"layer {li}: the experts' down projection expected on silu(gate) · up")
        names = [g.nodes[gu].input[0], g.nodes[dn].input[0]]
        g.claimed.update(names)
        return g.tensor(names[0]), g.tensor(names[1])

    def rope(self) -> None:
        """RoPE's inverse frequencies (the weight the Cos and Sin tables are computed from) must be θ's."""
        g, cfg = self.g, self.cfg
        cos = [i for i, n in enumerate(g.nodes) if n.op_type in ("Cos", "Sin")]
        found = {x for i in cos for j in g.ancestors(g.nodes[i].output[0]) for x in g.nodes[j].input if g.is_weight(x)}
        d = cfg.head_dim
        # as transformers computes them: 1 / θ^(2i/d) in float32
        want = (1.0 / cfg.rope_theta ** (np.arange(0, d, 2).astype(np.float32) / d)).astype(np.float32)
        if len(found) != 1:
            raise ModelImportError(f"{g.path}: RoPE's frequencies expected as one weight the Cos and Sin tables are "
                                   f"computed from; found {sorted(found) or 'none'}; {EXPORT_HINT}")
        name = found.pop()
        got = materialize(g.tensor(name))
        if got.shape != want.shape or not np.allclose(got, want, rtol=1e-5, atol=0):
            self.mismatch(f"RoPE's frequencies ({name})", f"{got.shape[0]} values from {got[:2].tolist()}",
                          f"θ = {cfg.rope_theta} over head_dim {d} ({want[:2].tolist()}…)")
        g.claimed.add(name)

    def unclaimed(self) -> None:
        """Every weight and float scalar constant must have been placed (selections in a Where excepted)."""
        g = self.g
        for name, t in g.inits.items():
            if name in g.claimed or t.data_type not in WEIGHT_TYPES:
                continue
            users = g.consumers.get(name, [])
            if not g.is_weight(name) and users and all(g.nodes[i].op_type == "Where" for i in users):
                continue
            where = f"read by {g.nodes[users[0]].op_type} in {g.scope(users[0])}" if users else "read by no node"
            kind = "weight" if g.is_weight(name) else "float constant"
            raise ModelImportError(f"{g.path}: {kind} {name!r} {list(t.dims)} ({where}) is not part of any block "
                                   f"the ONNX importer recognises; the graph may compute something the "
                                   f"{self.cfg.arch} family does not (its arithmetic would be lost)")


def load_onnx(path: str | Path) -> MoEModel:
    """Import a torch.onnx export (and the config.json beside it) into the project's MoEModel, strictly;
    weights in external data stay StoredTensors, read when used."""
    path = Path(path)
    cfg = describe_onnx(path)
    return _Reader(OnnxGraph(path), cfg).model()


__all__ = ["onnx_file", "load_onnx", "describe_onnx", "FAMILIES", "OPERATORS"]
