"""EdgeMoE: compile Mixture-of-Experts language models for small devices and run them with the
trunk resident and the experts streamed from storage. The API (api.py):

    edgemoe.compile(model_dir, output, target="host", bits=4, calibration=...)
    edgemoe.Session(artifact, cache_fraction=0.25).generate("ROMEO:", max_tokens=32, temperature=0.8, seed=1)
"""
from .api import Session, compile

__all__ = ["Session", "compile"]
