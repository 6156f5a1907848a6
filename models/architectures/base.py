"""What every architecture module provides, and the rules most of them share.

An architecture module holds all of exod's knowledge about one model family:
which tensors are attention, experts or router; how each strategy cuts them;
its KV-cache formula; and which strategies the runner has proven for it. The
planner and the runner both read it from here and nowhere else.
"""

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Optional

from exod.proto import exod_pb2 as pb

LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")

# Suffixes of the stored tensors of one module (quantized modules add scales and biases).
PARAM_SUFFIX = re.compile(r"\.(weight|scales|biases|bias|global_scale)$")


@dataclass(frozen=True)
class Split:
    """A strategy cuts a module's matrices along `side` ("rows": the output
    axis, "cols": the input axis) into `units` pieces named `unit`."""

    side: str
    units: int
    unit: str


@dataclass(frozen=True)
class KvPart:
    layer: int
    bytes_per_token: float
    window_tokens: int = 0
    split_units: int = 0
    kind: str = "kv"


@dataclass(frozen=True)
class Architecture:
    name: str
    model_types: tuple[str, ...]
    proven_strategies: frozenset[str]
    classify: Callable[[str], int]
    kv_cache: Callable[[dict, int], list[KvPart]]  # (config, bytes per element)
    tensor_split: Callable[[str, dict], Optional[Split]]  # module path -> split
    moe_tensor_split: Callable[[str, dict], Optional[Split]]
    experts: Callable[[dict], tuple[int, int]]  # (routed experts, experts per token)
    notes: tuple[str, ...] = field(default=())
    # The runner's canary: which layers can be computed alone from a hidden
    # state, and how to call one (layer module, probe input) -> output.
    canary_layers: Callable[[dict], list[int]] = field(default=lambda cfg: list(range(int(cfg["num_hidden_layers"]))))
    probe: Callable[[object, object, dict], object] = field(default=lambda layer, x, cfg: layer(x, None, None))
    # How to run one layer down the cached path (layer, x, cfg, cache) ->
    # output, for the canary's chunked prefill and one-token steps; None
    # where a layer cannot be run with a cache alone (the whole-model cached
    # check still covers it).
    step: Optional[Callable[[object, object, dict, object], object]] = field(default=lambda layer, x, cfg, cache: _step(layer, x, cache))
    # Only for a model that keeps state outside its layers, which exod's
    # generic stage (runner/pipeline.py) cannot carry between ranks:
    # (model, group, split, stages=None) -> None makes the model one pipeline
    # stage (stages: a hybrid's ranks per stage, runner/stages.py).
    pipeline: Optional[Callable[[object, object, list], None]] = None
    # Model types whose class carries that state itself (its own
    # pipeline()): one rank per stage only, so no hybrid stages.
    own_pipeline: frozenset = frozenset()


def _step(layer, x, cache):
    """A decoder layer's usual call with its cache and the mask mlx-lm's
    models build for it: the causal mask (none for one token), as an array,
    since some layers (DeepSeek-V3's) add it and do not take mlx-lm's
    "causal"; or, for a layer with recurrent state (mlx-lm's ArraysCache:
    convolutions, SSMs), the state's own mask, as hybrid models build it."""
    from mlx_lm.models.base import create_attention_mask, create_ssm_mask
    from mlx_lm.models.cache import ArraysCache

    if isinstance(cache, ArraysCache):
        return layer(x, create_ssm_mask(x, cache), cache)
    return layer(x, create_attention_mask(x, cache, return_array=True), cache)


# What a strategy needs from mlx-lm's class beyond the architecture's proof:
# tensor is the class's own shard(), so a class without one cannot.
CLASS_NEEDS = {"tensor": "shard"}
STRATEGIES = ("pipeline", "moe_tensor", "tensor", "moe_experts", "hybrid")
# Cutting strategies: each rank holds a share of what they cut, in grains (models/shares.py).
CUTTING = ("tensor", "moe_tensor", "moe_experts")
ROUTED = re.compile(r"(^|\.)(switch_mlp|experts)\.")


def moe_experts_split(arch: "Architecture", path: str, cfg: dict) -> Optional[Split]:
    """moe_experts, from the architecture's moe_tensor rules: the routed
    experts' projections are cut by whole experts (their first axis), each
    rank holding the experts of its share; a shared expert, which every
    token passes through, is cut on its intermediate axis as moe_tensor
    cuts it. One grain is then an expert with its slice of the shared
    expert."""
    split = arch.moe_tensor_split(path, cfg)
    if split is None or not ROUTED.search(path + "."):
        return split
    experts = arch.experts(cfg)[0]
    return Split("axis0", experts, "experts") if experts else None


def split_rule(strategy: str, arch: "Architecture") -> Callable[[str, dict], Optional[Split]]:
    """The (path, config) -> Split rule of a cutting strategy."""
    if strategy == "tensor":
        return arch.tensor_split
    if strategy == "moe_tensor":
        return arch.moe_tensor_split
    if strategy == "moe_experts":
        return lambda path, cfg: moe_experts_split(arch, path, cfg)
    raise ValueError(f"{strategy} cuts no tensors")


def strategy_refusal(strategy: str, arch: "Architecture", model_class, module_paths, cfg: dict) -> Optional[str]:
    """Why the runner will not run `strategy` on more than one rank for this
    model, or None. (One rank runs every model mlx-lm can load, whole.)

    The inventory asks with the checkpoint's module paths and puts the
    answers in the spec the planner reads; the runner asks with the built
    model's modules before it cuts anything. model_class None (a catalog card
    for a model type the installed mlx-lm lacks) skips the class's part."""
    if strategy.startswith("hybrid"):
        # Pipeline across stages, a cut inside them (hybrid_moe_tensor,
        # hybrid_tensor): proven wherever both are, with nothing of its own
        # to prove. Plain "hybrid" is the model's own cut, as the planner
        # picks it (placement/profile.py hybrid_inner): moe_tensor, else
        # tensor (a dense model, or an MoE whose moe_tensor is refused).
        inner = strategy.partition("_")[2]
        if cfg.get("model_type") in arch.own_pipeline:
            return (f"hybrid needs exod's pipeline stage; mlx-lm's {cfg['model_type']} class runs its own "
                    f"pipeline(), one rank per stage")
        pipeline = strategy_refusal("pipeline", arch, model_class, module_paths, cfg)
        if pipeline or inner:
            return pipeline or strategy_refusal(inner, arch, model_class, module_paths, cfg)
        moe_tensor = strategy_refusal("moe_tensor", arch, model_class, module_paths, cfg)
        tensor = moe_tensor and strategy_refusal("tensor", arch, model_class, module_paths, cfg)
        if tensor:
            return f"hybrid needs moe_tensor or tensor inside its stages: {moe_tensor}; {tensor}"
        return None
    if strategy not in arch.proven_strategies:
        return f"{strategy} is not proven for this architecture (proven: {', '.join(sorted(arch.proven_strategies))})"
    need = CLASS_NEEDS.get(strategy)
    if need and model_class is not None and not hasattr(model_class, need):
        return f"mlx-lm's {cfg['model_type']} class has no {need}(), which {strategy} uses"
    if strategy in ("moe_tensor", "moe_experts"):
        paths = list(module_paths)
        rule = split_rule(strategy, arch)
        if not any(rule(p, cfg) for p in paths):
            return (f"{strategy} needs a mixture-of-experts model; "
                    f"{cfg['model_type']} has no expert projections to split")
        whole = replicated_in_moe_blocks(paths, rule, cfg)
        if whole:
            return (f"{strategy} would sum {whole[0]} once per rank: it sits in an MoE block "
                    f"and the architecture does not split it")
    return None


def layer_of(name: str) -> int:
    m = LAYER.search(name)
    return int(m.group(1)) if m else -1


def module_of(name: str) -> tuple[str, str]:
    m = PARAM_SUFFIX.search(name)
    if not m:
        return name, ""
    return name[: m.start()], m.group(1)


# Ordered: the first matching rule names the class.
GENERIC_CLASSES: list[tuple[re.Pattern, int]] = [
    (re.compile(r"(^|\.)(embed_tokens|wte|tok_embeddings|embed)\."), pb.EMBEDDING),
    (re.compile(r"(^|\.)(lm_head|output|head)\."), pb.LM_HEAD),
    (re.compile(r"norm[^.]*\.(weight|bias)$|layernorm[^.]*\.(weight|bias)$"), pb.NORM),
    (re.compile(r"shared_experts?_gate\."), pb.ROUTER),
    (re.compile(r"shared_experts?\."), pb.SHARED_EXPERTS),
    (re.compile(r"(switch_mlp|experts)\."), pb.ROUTED_EXPERTS),
    (re.compile(r"(mlp|ffn|feed_forward|block_sparse_moe)\.(gate|router)\."), pb.ROUTER),
    (re.compile(r"(self_attn|attn|attention)\."), pb.ATTENTION),
    (re.compile(r"(mlp|ffn|feed_forward)\."), pb.DENSE_MLP),
]


def classify_generic(name: str) -> int:
    for pattern, cls in GENERIC_CLASSES:
        if pattern.search(name):
            return cls
    return pb.OTHER_TENSOR


def get(cfg: dict, *keys, default=None):
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    return default


def attention_dims(cfg: dict) -> tuple[int, int, int]:
    heads = int(get(cfg, "num_attention_heads", "n_heads"))
    kv_heads = int(get(cfg, "num_key_value_heads", "n_kv_heads", default=heads))
    head_dim = int(get(cfg, "head_dim", default=cfg["hidden_size"] // heads))
    return heads, kv_heads, head_dim


def gqa_kv_cache(cfg: dict, element_bytes: int) -> list[KvPart]:
    """K and V for every kv head; sliding-window layers capped at the window."""
    _, kv_heads, head_dim = attention_dims(cfg)
    per_token = 2 * kv_heads * head_dim * element_bytes
    layers = int(cfg["num_hidden_layers"])
    layer_types = cfg.get("layer_types")
    window = int(cfg.get("sliding_window") or 0)
    parts = []
    for i in range(layers):
        sliding = bool(layer_types) and layer_types[i] == "sliding_attention"
        if not layer_types and cfg.get("use_sliding_window") and window:
            sliding = i >= int(cfg.get("max_window_layers", 0))
        parts.append(
            KvPart(i, per_token, window if sliding else 0, kv_heads, "window" if sliding else "kv")
        )
    return parts


def quant_group_units(units: int, cols: int, cfg: dict, path: str) -> int:
    """Units a cut along the input axis may use: each rank must get whole units
    and, when quantized, whole quantization groups."""
    group = quant_group_size(cfg, path)
    if group:
        return math.gcd(units, cols // group)
    return units


def quant_group_size(cfg: dict, path: str) -> int:
    quant = cfg.get("quantization")
    if not quant:
        return 0
    override = quant.get(path)
    if override is False:
        return 0
    if isinstance(override, dict):
        return int(override.get("group_size", quant.get("group_size", 64)))
    return int(quant.get("group_size", 64))


ROW_PROJ = re.compile(r"(gate_proj|up_proj|w1|w3|gate_up_proj)$")
COL_PROJ = re.compile(r"(down_proj|w2)$")


def expert_split(path: str, cfg: dict, intermediate: int) -> Optional[Split]:
    """moe_tensor cuts every expert's projections on the intermediate axis."""
    leaf = path.rsplit(".", 1)[-1]
    if ROW_PROJ.search(leaf):
        return Split("rows", intermediate, "intermediate rows")
    if COL_PROJ.search(leaf):
        units = quant_group_units(intermediate, intermediate, cfg, path)
        return Split("cols", units, "intermediate columns (whole quantization groups)")
    return None


def moe_tensor_split_generic(routed_size_key: str, shared_size: Callable[[dict], int]):
    def split(path: str, cfg: dict) -> Optional[Split]:
        if re.search(r"shared_experts?\.", path + "."):
            return expert_split(path, cfg, shared_size(cfg))
        if re.search(r"(switch_mlp|experts)\.", path + "."):
            return expert_split(path, cfg, int(cfg[routed_size_key]))
        return None

    return split


# Modules inside an MoE block that only choose or weigh experts: moe_tensor
# replicates them, and that is right, because they feed no sum directly
# (a shared expert's gate multiplies a split output).
ROUTER = re.compile(r"^(gate|router|shared_experts?_gate)$")


def moe_block(path: str) -> Optional[str]:
    """The layer's direct child that holds `path`: an MoE block, when it
    holds an expert projection."""
    m = LAYER.search(path + ".")
    if not m:
        return None
    rest = (path + ".")[m.end():].split(".", 1)[0]
    return path[: m.end()] + rest if rest else None


def replicated_in_moe_blocks(module_paths, rule: Callable[[str, dict], Optional[Split]], cfg: dict) -> list[str]:
    """Modules holding weights inside an MoE block that moe_tensor would
    leave whole, routers aside. moe_tensor all-sums each block's output, so
    such a module's contribution would count once per rank: a model with
    one is not a model moe_tensor can cut. The inventory (over tensor names)
    and the runner (over the built model's modules) both ask this."""
    paths = sorted(set(module_paths))
    blocks = {moe_block(p) for p in paths if rule(p, cfg) is not None}
    blocks.discard(None)
    out = []
    for p in paths:
        block = moe_block(p)
        if block in blocks and p != block and rule(p, cfg) is None:
            first = p[len(block) + 1:].split(".", 1)[0]
            if not ROUTER.match(first):
                out.append(p)
    return out


def gqa_tensor_split(path: str, cfg: dict) -> Optional[Split]:
    """mlx-lm's shard() for GQA attention with dense or switch MLPs."""
    heads, kv_heads, head_dim = attention_dims(cfg)
    leaf = path.rsplit(".", 1)[-1]
    if ".self_attn." in path + ".":
        if leaf == "q_proj":
            return Split("rows", heads, "attention heads")
        if leaf in ("k_proj", "v_proj"):
            return Split("rows", kv_heads, "kv heads")
        if leaf == "o_proj":
            return Split("cols", quant_group_units(heads, heads * head_dim, cfg, path), "attention heads")
        return None
    if re.search(r"shared_experts?\.", path + "."):
        size = int(get(cfg, "shared_expert_intermediate_size", "moe_intermediate_size"))
        return expert_split(path, cfg, size)
    if re.search(r"(switch_mlp|experts)\.", path + "."):
        return expert_split(path, cfg, int(get(cfg, "moe_intermediate_size", "intermediate_size")))
    if ".mlp." in path + "." and not re.search(r"\.mlp\.(gate|router)$", path):
        return expert_split(path, cfg, int(cfg["intermediate_size"]))
    return None


def no_experts(cfg: dict) -> tuple[int, int]:
    return 0, 0
