"""Constants of the memory and cost models, each with where it comes from.

Measured ones are re-derived by `python -m bench overhead`, which prints the
figures these were taken from (see docs/cost-model.md).
"""

# Resident memory of a runner process before any weight is loaded: Python,
# mlx, mlx-lm, gRPC. Measured 86 MB on x86_64 Linux (bench overhead,
# "process_base_bytes"); rounded up.
PROCESS_BASE_BYTES = 100_000_000

# mlx-lm prefills in chunks of this many tokens (generate.py prefill_step_size).
PREFILL_CHUNK_TOKENS = 2048

# Peak transient bytes of a prefill chunk, per chunk token, per element of
# (hidden_size + widest intermediate a token passes through: the dense MLP,
# or experts_per_token x the expert width). Measured 29.3 (dense fp32), 37.9
# (dense bf16) and 44.9 (MoE fp32) on x86_64 Linux: bench overhead,
# "activation_bytes_per_token_element"; the maximum, rounded up.
ACTIVATION_BYTES_PER_TOKEN_ELEMENT = 48.0

# Share of a node's usable memory the planner leaves free by default.
DEFAULT_HEADROOM = 0.05

# Fixed cost of one decode step on a rank (sampling, Python, graph build),
# per layer held (kernel dispatch), and MLX's own work per collective beyond
# the wire. Defaults for a node that has not run `exod calibrate`, which
# measures all three (NodeProfile.calibration; docs/cost-model.md).
DEFAULT_STEP_OVERHEAD_S = 0.002
LAYER_DISPATCH_S = 40e-6
DEFAULT_COLLECTIVE_S = 0.0

# Links the daemon has not measured yet (and `exod plan --nodes N`): a 10 GbE
# switch. rtt from a ping-pong over a 10 GbE switch; bandwidth ~ line rate.
ASSUMED_LINK_RTT_S = 200e-6
ASSUMED_LINK_BANDWIDTH = 1.1e9

# jaccl over RDMA when a link has no measured RDMA rtt: Thunderbolt 5 RDMA
# round trips are reported around 10 us by MLX; kept as an assumption.
ASSUMED_RDMA_RTT_S = 10e-6

# Within this fraction of the fastest prediction, fewer nodes win.
FEWER_NODES_MARGIN = 0.05

# On this many eligible nodes or fewer, every hybrid split is evaluated and
# listed (a few, and cheap), so that the plan shows the hybrid's figures
# even where it cannot be chosen; on more, splits that a lower bound proves
# cannot be chosen are left out (placement/hybrid.py).
HYBRID_EVERY_SPLIT_UP_TO = 4

# Even shares win over balanced uneven ones predicted at most this much
# faster (when they fit): nodes of one kind, whose measured bandwidths
# differ by noise, keep the same shares placement after placement, so that
# their shard checkpoints are found again.
EVEN_SHARES_MARGIN = 0.05

# Default context and concurrency of a request. Concurrency is the number of
# sequences an instance decodes at once (its runner's batch bound): the KV
# of that many full contexts is reserved.
DEFAULT_CONTEXT = 4096
DEFAULT_CONCURRENCY = 8

# moe_experts by routing load: replica slots tried per MoE layer, as
# fractions of the experts (smallest first), and the cut in the batched
# routing imbalance a replica set must bring to be kept; replicas cost the
# memory they occupy on every rank that holds one.
REPLICA_FRACTIONS = (1 / 16, 1 / 8, 1 / 4)
REPLICA_GAIN = 0.05
# A moe_experts candidate's uniform figure bounds it once experts are placed
# by routing load, within the rounding of whole experts: this much slack
# keeps a candidate that might still be chosen.
ROUTING_BOUND_SLACK = 0.02
