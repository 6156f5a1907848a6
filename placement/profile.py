"""A model reduced to what the planner needs, computed once per model.

Per layer (and for the tensors outside any layer): bytes by tensor class,
the part of those bytes each strategy divides, the bytes one decode step
reads, and the KV-cache parts. Plus the grains each tensor strategy cuts
in (models/shares.py): a rank's share of every cut tensor is `share` of
`of` grains, so that the bytes it holds are exact for uneven shares too.
"""

from dataclasses import dataclass, field

from exod.models import shares
from exod.models.quantization import DTYPE_BYTES
from exod.proto import exod_pb2 as pb

CLASSES = (
    pb.EMBEDDING, pb.LM_HEAD, pb.ATTENTION, pb.DENSE_MLP, pb.ROUTER,
    pb.ROUTED_EXPERTS, pb.SHARED_EXPERTS, pb.NORM, pb.OTHER_TENSOR,
)
CLASS_FIELD = {
    pb.EMBEDDING: "embedding_bytes", pb.LM_HEAD: "lm_head_bytes", pb.ATTENTION: "attention_bytes",
    pb.DENSE_MLP: "dense_mlp_bytes", pb.ROUTER: "router_bytes", pb.ROUTED_EXPERTS: "routed_experts_bytes",
    pb.SHARED_EXPERTS: "shared_experts_bytes", pb.NORM: "norm_bytes", pb.OTHER_TENSOR: "other_bytes",
}
CLASS_LABEL = {
    pb.EMBEDDING: "embedding", pb.LM_HEAD: "lm_head", pb.ATTENTION: "attention", pb.DENSE_MLP: "dense MLP",
    pb.ROUTER: "router", pb.ROUTED_EXPERTS: "experts", pb.SHARED_EXPERTS: "shared experts",
    pb.NORM: "norms", pb.OTHER_TENSOR: "other",
}
SPLITTING = ("tensor", "moe_tensor", "moe_experts")
HALF_PRECISION = ("float16", "bfloat16")


@dataclass
class Part:
    """Bytes of one layer (or of the non-layer tensors), by class."""

    full: dict = field(default_factory=lambda: dict.fromkeys(CLASSES, 0))
    split: dict = field(default_factory=lambda: {s: dict.fromkeys(CLASSES, 0) for s in SPLITTING})
    read_all: float = 0.0  # bytes one decode step reads
    read_split: dict = field(default_factory=lambda: dict.fromkeys(SPLITTING, 0.0))
    kv: list = field(default_factory=list)  # (bytes_per_token, window_tokens, split_units)
    # Bytes stored in float16/bfloat16 (a quantized matrix's scales and
    # biases included), which the canary's float32 probes widen (planner.canary_bytes).
    half: int = 0

    def weights(self, strategy: str, share: int, of: int) -> dict:
        """Bytes by class on a rank holding `share` of `of` grains (1 of n:
        an even split). Exact: every cut tensor's bytes divide by `of`."""
        if strategy not in SPLITTING or share == of:
            return dict(self.full)
        split = self.split[strategy]
        return {c: self.full[c] - split[c] + split[c] * share // of for c in CLASSES}

    def read(self, strategy: str, share: int, of: int) -> float:
        """Bytes one decode step reads on a rank holding `share` of `of` grains."""
        if strategy not in SPLITTING or share == of:
            return self.read_all
        return self.read_all - self.read_split[strategy] + self.read_split[strategy] * share / of

    def kv_bytes(self, strategy: str, share: int, of: int, context: int, concurrency: int) -> float:
        total = 0.0
        for per_token, window, units in self.kv:
            tokens = min(context, window) if window else context
            part = per_token * tokens * concurrency
            if strategy == "tensor" and units and share != of and units % of == 0:
                part = part * share / of  # whole kv heads: a grain is a KV-head group
            total += part
        return total


@dataclass
class ModelProfile:
    model_id: str
    num_layers: int
    is_moe: bool
    proven: frozenset  # strategies the runner runs on more than one rank
    refused: dict  # strategy -> why the runner will not
    max_context: int
    hidden_size: int
    activation_bytes: int  # bytes per activation element (checkpoint dtype)
    layers: list  # Part per layer
    outside: Part  # tensors outside any layer: embedding, lm_head, final norm
    # strategy -> list of (units, unit name, example tensor) of the cut tensors
    divisibility: dict
    grains: dict  # strategy -> grains every cut tensor divides into (0: none cut)
    moe_layers: int  # layers whose MoE block is all-summed under moe_tensor
    total_bytes: int
    max_intermediate: int  # widest intermediate one token passes through
    # The runner decodes one sequence at a time: always, or on 2+ pipeline
    # stages (ModelSpec.unbatched, unbatched_pipeline).
    unbatched: bool = False
    unbatched_pipeline: bool = False
    num_experts: int = 0  # routed experts per MoE layer (0: dense)
    experts_per_token: int = 0
    moe_layer_ids: tuple = ()  # the layers that hold routed experts, ascending
    # Derived once and kept (and the canary's widest part): running sums over the layers, per (strategy, grains, context,
    # concurrency): derived from the fields above, kept so that a plan's
    # many candidates sum any layer range in O(classes) (range_sums).
    sums: dict = field(default_factory=dict, compare=False, repr=False)


# The columns range_sums keeps per layer.
N_CLASSES = len(CLASSES)
FULL, SPLIT, READ_ALL, READ_SPLIT, KV_FIXED, KV_CUT, KV1_FIXED, KV1_CUT = (
    0, N_CLASSES, 2 * N_CLASSES, 2 * N_CLASSES + 1, 2 * N_CLASSES + 2, 2 * N_CLASSES + 3,
    2 * N_CLASSES + 4, 2 * N_CLASSES + 5)


def range_sums(model: ModelProfile, strategy: str, of: int, context: int, concurrency: int) -> tuple[list, list]:
    """(running sums over the layers, the non-layer part) of: bytes by
    class, the bytes the strategy cuts by class, bytes read (all, cut), and
    KV at (context, concurrency) and per token, each split into what stays
    whole and what a rank holding some of `of` grains holds a share of."""
    key = (strategy, of, context, concurrency)
    if key in model.sums:
        return model.sums[key]

    def row(part: Part) -> list:
        split = part.split.get(strategy)
        kv = [0.0, 0.0, 0.0, 0.0]
        for per_token, window, units in part.kv:
            tokens = min(context, window) if window else context
            cut = strategy == "tensor" and bool(units) and of > 0 and units % of == 0
            kv[1 if cut else 0] += per_token * tokens * concurrency
            kv[3 if cut else 2] += per_token
        return [*(part.full[c] for c in CLASSES), *((split[c] if split else 0) for c in CLASSES),
                part.read_all, part.read_split[strategy] if split else 0.0, *kv]

    running = [[0] * (KV1_CUT + 1)]
    for part in model.layers:
        running.append([a + b for a, b in zip(running[-1], row(part))])
    model.sums[key] = (running, row(model.outside))
    return model.sums[key]


def profile(spec: pb.ModelSpec) -> ModelProfile:
    layers = [Part() for _ in range(spec.num_layers)]
    outside = Part()
    divisibility = {s: {} for s in SPLITTING}
    moe_layer_ids = set()
    active_fraction = spec.experts_per_token / spec.num_experts if spec.num_experts else 1.0
    max_intermediate = 0
    for t in spec.tensors:
        part = layers[t.layer] if 0 <= t.layer < spec.num_layers else outside
        cls = t.tensor_class if t.tensor_class in CLASSES else pb.OTHER_TENSOR
        part.full[cls] += t.bytes
        if t.dtype in HALF_PRECISION:
            part.half += t.bytes
        if cls == pb.EMBEDDING:
            read = t.bytes / max(spec.vocab_size, 1)  # one row per token
        elif cls == pb.ROUTED_EXPERTS:
            read = t.bytes * active_fraction
            moe_layer_ids.add(t.layer)
        else:
            read = t.bytes
        part.read_all += read
        for strategy, rule in (("tensor", t.tensor_split), ("moe_tensor", t.moe_tensor_split),
                               ("moe_experts", t.moe_experts_split)):
            if not rule.units:
                continue
            part.split[strategy][cls] += t.bytes
            part.read_split[strategy] += read
            divisibility[strategy].setdefault(rule.units, (rule.unit, t.name.rsplit(".", 1)[0]))
            if cls in (pb.SHARED_EXPERTS, pb.DENSE_MLP) and rule.axis == -2:
                max_intermediate = max(max_intermediate, rule.units)
            if cls == pb.ROUTED_EXPERTS and rule.axis == -2:
                max_intermediate = max(max_intermediate, rule.units * max(spec.experts_per_token, 1))
    for kv in spec.kv_cache:
        if kv.layer < spec.num_layers:
            layers[kv.layer].kv.append((kv.bytes_per_token, kv.window_tokens, kv.split_units))
    return ModelProfile(
        model_id=spec.model_id,
        num_layers=spec.num_layers,
        is_moe=spec.num_experts > 0,
        proven=_with_hybrid(frozenset(spec.proven_strategies), dict(spec.refused_strategies), spec.num_experts > 0),
        refused=_refused_with_hybrid(spec),
        max_context=spec.max_context,
        hidden_size=spec.hidden_size,
        activation_bytes=DTYPE_BYTES.get(spec.dtype, 2),
        layers=layers,
        outside=outside,
        divisibility={s: sorted((u, n, t) for u, (n, t) in d.items()) for s, d in divisibility.items()},
        grains={s: shares.grains_of(d) for s, d in divisibility.items()},
        moe_layers=len(moe_layer_ids),
        total_bytes=spec.total_bytes,
        max_intermediate=max_intermediate,
        unbatched=spec.unbatched,
        unbatched_pipeline=spec.unbatched_pipeline,
        num_experts=spec.num_experts,
        experts_per_token=spec.experts_per_token,
        moe_layer_ids=tuple(sorted(i for i in moe_layer_ids if 0 <= i < spec.num_layers)),
    )


# Hybrid runs pipeline across stages and a cut inside each stage of 2+ ranks:
# moe_tensor for an MoE model whose moe_tensor is proven, else tensor where
# tensor is proven (a dense model, or an MoE whose moe_tensor is refused).
# One cut per model, so that the search is not doubled; the inventory's
# verdict (models/architectures/base.py strategy_refusal) tries them in the
# same order.
HYBRID_INNER = ("moe_tensor", "tensor")


def hybrid_inner(is_moe: bool, proven) -> str | None:
    """The cut inside a hybrid's stages, or None: no hybrid."""
    if is_moe and "moe_tensor" in proven:
        return "moe_tensor"
    return "tensor" if "tensor" in proven else None


def _with_hybrid(proven: frozenset, refused: dict = None, is_moe: bool = True) -> frozenset:
    """The inventory's own verdict on hybrid where the spec has one (an
    architecture can refuse stages, models/architectures/base.py
    own_pipeline); derived from its parts for a spec made before."""
    if "hybrid" in proven or "hybrid" in (refused or {}):
        return proven
    both = "pipeline" in proven and hybrid_inner(is_moe, proven) is not None
    return proven | ({"hybrid"} if both else frozenset())


def _refused_with_hybrid(spec: pb.ModelSpec) -> dict:
    if "hybrid" in spec.refused_strategies or "hybrid" in spec.proven_strategies:
        return dict(spec.refused_strategies)
    refused = dict(spec.refused_strategies)
    proven = set(spec.proven_strategies)

    def why(strategy):
        return refused.get(strategy) or f"{strategy} is not proven for this architecture"

    if "pipeline" not in proven:
        refused["hybrid"] = f"hybrid runs pipeline across its stages: {why('pipeline')}"
    elif hybrid_inner(spec.num_experts > 0, proven) is None:
        # As models/architectures/base.py words it: both cuts, each refused.
        moe_tensor = why("moe_tensor") if spec.num_experts else "moe_tensor needs a mixture-of-experts model"
        refused["hybrid"] = f"hybrid needs moe_tensor or tensor inside its stages: {moe_tensor}; {why('tensor')}"
    return refused
