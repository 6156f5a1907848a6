"""Registry of architecture modules, keyed by config.json model_type."""

from . import deepseek_v3, deepseek_v4, generic, glm4_moe, gpt_oss, llama, qwen3_moe
from .base import LAYER, Architecture, KvPart, Split, layer_of, module_of

ALL = [m.ARCHITECTURE for m in (llama, qwen3_moe, deepseek_v3, deepseek_v4, glm4_moe, gpt_oss)]
BY_MODEL_TYPE = {t: arch for arch in ALL for t in arch.model_types}


def for_model_type(model_type: str) -> Architecture:
    return BY_MODEL_TYPE.get(model_type, generic.ARCHITECTURE)


__all__ = ["LAYER", "Architecture", "KvPart", "Split", "for_model_type", "layer_of", "module_of", "ALL"]
