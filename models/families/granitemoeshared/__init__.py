"""GraniteMoeShared (IBM Granite MoE with a shared expert): GraniteMoE's layer (its multipliers
folded as models/families/granitemoe describes) plus an ungated SwiGLU MLP that every token runs,
its output added to the experts' before the residual multiplier. The shared MLP is the
architecture description's shared expert (resident, at the trunk's bits); with
``shared_intermediate_size`` 0 the model is plain GraniteMoE."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ...config import MoEModel
from ...hf_import import ConfigReader, ModelImportError, read_config
from ..granitemoe import _describe as granite_describe, load_granite

ARCHITECTURES = ("GraniteMoeSharedForCausalLM",)


def describe(hf: dict, where: Path):
    return _describe(ConfigReader(hf, where, "GraniteMoeShared"))[0]


def _describe(c: ConfigReader):
    shared = c.get("shared_intermediate_size", 0)
    if isinstance(shared, bool) or not isinstance(shared, int) or shared < 0:
        raise ModelImportError(f"{c.where}/config.json: shared_intermediate_size = {shared!r} is not supported for "
                               "GraniteMoeShared: it must be a whole number ≥ 0")
    cfg, mult = granite_describe(c)
    return replace(cfg, arch="granitemoeshared", shared_expert_intermediate=shared), mult


def load(model_dir: Path) -> MoEModel:
    cfg, mult = _describe(ConfigReader(read_config(model_dir), model_dir, "GraniteMoeShared"))
    return load_granite(model_dir, cfg, mult, "GraniteMoeShared")
