"""d2f: Discrete Diffusion Forcing (arXiv 2508.09192) on stock transformers models.

Public API: `load_model` (LLaDA / Dream checkpoints and D2F LoRA adapters in their original formats),
`generate` + `DecodeConfig` (D2F pipelined decoding and the baselines), `save_model` /
`save_adapter` (back to the original formats), `family_of` (the family facts of a model).
"""

from d2f.adapters import save_adapter
from d2f.decoding import DecodeConfig, DecodeOutput, generate
from d2f.family import Family, family_of
from d2f.models import build_model, load_model, save_model

__all__ = [
    "DecodeConfig",
    "DecodeOutput",
    "Family",
    "build_model",
    "family_of",
    "generate",
    "load_model",
    "save_adapter",
    "save_model",
]
