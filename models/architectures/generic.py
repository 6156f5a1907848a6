"""Fallback for model types exod knows nothing special about: a decoder
whose layers sit in one list (pipeline is exod's generic stage), the generic
GQA KV cache, and, for mixtures of experts whose expert projections carry the
usual names (SwitchGLU's gate_proj, up_proj, down_proj under switch_mlp or
experts), moe_tensor over them."""

from typing import Optional

from .base import Architecture, Split, classify_generic, expert_split, get, gqa_kv_cache, gqa_tensor_split


def _experts(cfg: dict) -> tuple[int, int]:
    experts = int(get(cfg, "num_experts", "n_routed_experts", "num_local_experts", default=0))
    per_token = int(get(cfg, "num_experts_per_tok", "experts_per_token", default=0))
    return (experts, per_token) if experts else (0, 0)


def _moe_tensor_split(path: str, cfg: dict) -> Optional[Split]:
    """Routed experts only: their width is moe_intermediate_size where the
    config has one, else intermediate_size (mixtral, olmoe). A shared expert
    is left whole, so a block with one is refused (replicated_in_moe_blocks),
    never summed once per rank."""
    import re

    if not _experts(cfg)[0] or not re.search(r"\.(switch_mlp|experts)\.", path + "."):
        return None
    width = get(cfg, "moe_intermediate_size", "intermediate_size")
    return expert_split(path, cfg, int(width)) if width else None


ARCHITECTURE = Architecture(
    name="generic",
    model_types=(),
    proven_strategies=frozenset({"pipeline", "moe_tensor", "moe_experts"}),
    classify=classify_generic,
    kv_cache=gqa_kv_cache,
    tensor_split=gqa_tensor_split,
    moe_tensor_split=_moe_tensor_split,
    experts=_experts,
    notes=("no architecture module: KV cache from the generic GQA formula; pipeline by exod's generic stage; "
           "moe_tensor where the experts carry the usual names",),
)
