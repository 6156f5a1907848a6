from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InterfaceKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INTERFACE_KIND_UNSPECIFIED: _ClassVar[InterfaceKind]
    ETHERNET: _ClassVar[InterfaceKind]
    WIFI: _ClassVar[InterfaceKind]
    THUNDERBOLT: _ClassVar[InterfaceKind]
    LOOPBACK: _ClassVar[InterfaceKind]
    OTHER: _ClassVar[InterfaceKind]

class TensorClass(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TENSOR_CLASS_UNSPECIFIED: _ClassVar[TensorClass]
    EMBEDDING: _ClassVar[TensorClass]
    LM_HEAD: _ClassVar[TensorClass]
    ATTENTION: _ClassVar[TensorClass]
    DENSE_MLP: _ClassVar[TensorClass]
    ROUTER: _ClassVar[TensorClass]
    ROUTED_EXPERTS: _ClassVar[TensorClass]
    SHARED_EXPERTS: _ClassVar[TensorClass]
    NORM: _ClassVar[TensorClass]
    OTHER_TENSOR: _ClassVar[TensorClass]

class Strategy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STRATEGY_UNSPECIFIED: _ClassVar[Strategy]
    PIPELINE: _ClassVar[Strategy]
    MOE_TENSOR: _ClassVar[Strategy]
    TENSOR: _ClassVar[Strategy]
    MOE_EXPERTS: _ClassVar[Strategy]
    HYBRID: _ClassVar[Strategy]

class Backend(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BACKEND_UNSPECIFIED: _ClassVar[Backend]
    RING: _ClassVar[Backend]
    JACCL: _ClassVar[Backend]

class RestartPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RESTART_NEVER: _ClassVar[RestartPolicy]
    RESTART_REPLACE: _ClassVar[RestartPolicy]

class RunnerState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUNNER_STATE_UNSPECIFIED: _ClassVar[RunnerState]
    IDLE: _ClassVar[RunnerState]
    CONNECTING: _ClassVar[RunnerState]
    CONNECTED: _ClassVar[RunnerState]
    LOADING: _ClassVar[RunnerState]
    LOADED: _ClassVar[RunnerState]
    WARMING_UP: _ClassVar[RunnerState]
    READY: _ClassVar[RunnerState]
    RUNNING: _ClassVar[RunnerState]
    SHUTTING_DOWN: _ClassVar[RunnerState]
    SHUTDOWN: _ClassVar[RunnerState]
    FAILED: _ClassVar[RunnerState]
    DOWNLOADING: _ClassVar[RunnerState]

class InstanceState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INSTANCE_STATE_UNSPECIFIED: _ClassVar[InstanceState]
    INSTANCE_PENDING: _ClassVar[InstanceState]
    INSTANCE_STARTING: _ClassVar[InstanceState]
    INSTANCE_READY: _ClassVar[InstanceState]
    INSTANCE_FAILED: _ClassVar[InstanceState]
    INSTANCE_STOPPED: _ClassVar[InstanceState]

class ErrorKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_KIND_UNSPECIFIED: _ClassVar[ErrorKind]
    ERROR_INVALID_REQUEST: _ClassVar[ErrorKind]
    ERROR_CONTEXT_LENGTH: _ClassVar[ErrorKind]
    ERROR_OVERLOADED: _ClassVar[ErrorKind]
    ERROR_INTERNAL: _ClassVar[ErrorKind]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_STOP: _ClassVar[FinishReason]
    FINISH_LENGTH: _ClassVar[FinishReason]
    FINISH_CANCELLED: _ClassVar[FinishReason]
    FINISH_ERROR: _ClassVar[FinishReason]

class NodeStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NODE_STATUS_UNSPECIFIED: _ClassVar[NodeStatus]
    UP: _ClassVar[NodeStatus]
    SUSPECT: _ClassVar[NodeStatus]
    DOWN: _ClassVar[NodeStatus]
    LEFT: _ClassVar[NodeStatus]
INTERFACE_KIND_UNSPECIFIED: InterfaceKind
ETHERNET: InterfaceKind
WIFI: InterfaceKind
THUNDERBOLT: InterfaceKind
LOOPBACK: InterfaceKind
OTHER: InterfaceKind
TENSOR_CLASS_UNSPECIFIED: TensorClass
EMBEDDING: TensorClass
LM_HEAD: TensorClass
ATTENTION: TensorClass
DENSE_MLP: TensorClass
ROUTER: TensorClass
ROUTED_EXPERTS: TensorClass
SHARED_EXPERTS: TensorClass
NORM: TensorClass
OTHER_TENSOR: TensorClass
STRATEGY_UNSPECIFIED: Strategy
PIPELINE: Strategy
MOE_TENSOR: Strategy
TENSOR: Strategy
MOE_EXPERTS: Strategy
HYBRID: Strategy
BACKEND_UNSPECIFIED: Backend
RING: Backend
JACCL: Backend
RESTART_NEVER: RestartPolicy
RESTART_REPLACE: RestartPolicy
RUNNER_STATE_UNSPECIFIED: RunnerState
IDLE: RunnerState
CONNECTING: RunnerState
CONNECTED: RunnerState
LOADING: RunnerState
LOADED: RunnerState
WARMING_UP: RunnerState
READY: RunnerState
RUNNING: RunnerState
SHUTTING_DOWN: RunnerState
SHUTDOWN: RunnerState
FAILED: RunnerState
DOWNLOADING: RunnerState
INSTANCE_STATE_UNSPECIFIED: InstanceState
INSTANCE_PENDING: InstanceState
INSTANCE_STARTING: InstanceState
INSTANCE_READY: InstanceState
INSTANCE_FAILED: InstanceState
INSTANCE_STOPPED: InstanceState
ERROR_KIND_UNSPECIFIED: ErrorKind
ERROR_INVALID_REQUEST: ErrorKind
ERROR_CONTEXT_LENGTH: ErrorKind
ERROR_OVERLOADED: ErrorKind
ERROR_INTERNAL: ErrorKind
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_STOP: FinishReason
FINISH_LENGTH: FinishReason
FINISH_CANCELLED: FinishReason
FINISH_ERROR: FinishReason
NODE_STATUS_UNSPECIFIED: NodeStatus
UP: NodeStatus
SUSPECT: NodeStatus
DOWN: NodeStatus
LEFT: NodeStatus

class NetworkInterface(_message.Message):
    __slots__ = ("name", "kind", "addresses", "speed_bits_per_s")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    SPEED_BITS_PER_S_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: InterfaceKind
    addresses: _containers.RepeatedScalarFieldContainer[str]
    speed_bits_per_s: int
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[_Union[InterfaceKind, str]] = ..., addresses: _Optional[_Iterable[str]] = ..., speed_bits_per_s: _Optional[int] = ...) -> None: ...

class RdmaDevice(_message.Message):
    __slots__ = ("name", "interface")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INTERFACE_FIELD_NUMBER: _ClassVar[int]
    name: str
    interface: str
    def __init__(self, name: _Optional[str] = ..., interface: _Optional[str] = ...) -> None: ...

class NodeProfile(_message.Message):
    __slots__ = ("node_id", "name", "chip", "cores", "memory_total_bytes", "memory_available_bytes", "memory_usable_bytes", "memory_bandwidth_bytes_per_s", "backends", "interfaces", "rdma_devices", "os", "version", "calibration", "gpu_working_set_bytes", "models")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CHIP_FIELD_NUMBER: _ClassVar[int]
    CORES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BANDWIDTH_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    INTERFACES_FIELD_NUMBER: _ClassVar[int]
    RDMA_DEVICES_FIELD_NUMBER: _ClassVar[int]
    OS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_FIELD_NUMBER: _ClassVar[int]
    GPU_WORKING_SET_BYTES_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    name: str
    chip: str
    cores: int
    memory_total_bytes: int
    memory_available_bytes: int
    memory_usable_bytes: int
    memory_bandwidth_bytes_per_s: float
    backends: _containers.RepeatedScalarFieldContainer[str]
    interfaces: _containers.RepeatedCompositeFieldContainer[NetworkInterface]
    rdma_devices: _containers.RepeatedCompositeFieldContainer[RdmaDevice]
    os: str
    version: int
    calibration: NodeCalibration
    gpu_working_set_bytes: int
    models: _containers.RepeatedCompositeFieldContainer[ModelHolding]
    def __init__(self, node_id: _Optional[str] = ..., name: _Optional[str] = ..., chip: _Optional[str] = ..., cores: _Optional[int] = ..., memory_total_bytes: _Optional[int] = ..., memory_available_bytes: _Optional[int] = ..., memory_usable_bytes: _Optional[int] = ..., memory_bandwidth_bytes_per_s: _Optional[float] = ..., backends: _Optional[_Iterable[str]] = ..., interfaces: _Optional[_Iterable[_Union[NetworkInterface, _Mapping]]] = ..., rdma_devices: _Optional[_Iterable[_Union[RdmaDevice, _Mapping]]] = ..., os: _Optional[str] = ..., version: _Optional[int] = ..., calibration: _Optional[_Union[NodeCalibration, _Mapping]] = ..., gpu_working_set_bytes: _Optional[int] = ..., models: _Optional[_Iterable[_Union[ModelHolding, _Mapping]]] = ...) -> None: ...

class ModelFile(_message.Message):
    __slots__ = ("name", "size", "sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    size: int
    sha256: str
    def __init__(self, name: _Optional[str] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class ShardOf(_message.Message):
    __slots__ = ("strategy", "rank", "world_size", "layer_start", "layer_end", "grains")
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    GRAINS_FIELD_NUMBER: _ClassVar[int]
    strategy: str
    rank: int
    world_size: int
    layer_start: int
    layer_end: int
    grains: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, strategy: _Optional[str] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., grains: _Optional[_Iterable[int]] = ...) -> None: ...

class ModelHolding(_message.Message):
    __slots__ = ("model_id", "revision", "files", "complete", "store", "bytes", "shard")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    STORE_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    revision: str
    files: _containers.RepeatedCompositeFieldContainer[ModelFile]
    complete: bool
    store: str
    bytes: int
    shard: ShardOf
    def __init__(self, model_id: _Optional[str] = ..., revision: _Optional[str] = ..., files: _Optional[_Iterable[_Union[ModelFile, _Mapping]]] = ..., complete: _Optional[bool] = ..., store: _Optional[str] = ..., bytes: _Optional[int] = ..., shard: _Optional[_Union[ShardOf, _Mapping]] = ...) -> None: ...

class NodeCalibration(_message.Message):
    __slots__ = ("decode_bytes_per_s", "step_s", "layer_s", "collective_s", "busy_ranks", "mlx_version", "chip", "measured_at_unix_ms", "fit_worst_error")
    DECODE_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    STEP_S_FIELD_NUMBER: _ClassVar[int]
    LAYER_S_FIELD_NUMBER: _ClassVar[int]
    COLLECTIVE_S_FIELD_NUMBER: _ClassVar[int]
    BUSY_RANKS_FIELD_NUMBER: _ClassVar[int]
    MLX_VERSION_FIELD_NUMBER: _ClassVar[int]
    CHIP_FIELD_NUMBER: _ClassVar[int]
    MEASURED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    FIT_WORST_ERROR_FIELD_NUMBER: _ClassVar[int]
    decode_bytes_per_s: float
    step_s: float
    layer_s: float
    collective_s: float
    busy_ranks: int
    mlx_version: str
    chip: str
    measured_at_unix_ms: int
    fit_worst_error: float
    def __init__(self, decode_bytes_per_s: _Optional[float] = ..., step_s: _Optional[float] = ..., layer_s: _Optional[float] = ..., collective_s: _Optional[float] = ..., busy_ranks: _Optional[int] = ..., mlx_version: _Optional[str] = ..., chip: _Optional[str] = ..., measured_at_unix_ms: _Optional[int] = ..., fit_worst_error: _Optional[float] = ...) -> None: ...

class Link(_message.Message):
    __slots__ = ("from_node", "to_node", "from_address", "to_address", "rtt_s", "bandwidth_bytes_per_s", "rdma", "rdma_rtt_s", "measured_at_unix_ms", "probes")
    FROM_NODE_FIELD_NUMBER: _ClassVar[int]
    TO_NODE_FIELD_NUMBER: _ClassVar[int]
    FROM_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TO_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    RTT_S_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTH_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    RDMA_FIELD_NUMBER: _ClassVar[int]
    RDMA_RTT_S_FIELD_NUMBER: _ClassVar[int]
    MEASURED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    PROBES_FIELD_NUMBER: _ClassVar[int]
    from_node: str
    to_node: str
    from_address: str
    to_address: str
    rtt_s: float
    bandwidth_bytes_per_s: float
    rdma: bool
    rdma_rtt_s: float
    measured_at_unix_ms: int
    probes: _containers.RepeatedCompositeFieldContainer[AddressProbe]
    def __init__(self, from_node: _Optional[str] = ..., to_node: _Optional[str] = ..., from_address: _Optional[str] = ..., to_address: _Optional[str] = ..., rtt_s: _Optional[float] = ..., bandwidth_bytes_per_s: _Optional[float] = ..., rdma: _Optional[bool] = ..., rdma_rtt_s: _Optional[float] = ..., measured_at_unix_ms: _Optional[int] = ..., probes: _Optional[_Iterable[_Union[AddressProbe, _Mapping]]] = ...) -> None: ...

class AddressProbe(_message.Message):
    __slots__ = ("address", "rtt_s", "reachable", "error")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    RTT_S_FIELD_NUMBER: _ClassVar[int]
    REACHABLE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    address: str
    rtt_s: float
    reachable: bool
    error: str
    def __init__(self, address: _Optional[str] = ..., rtt_s: _Optional[float] = ..., reachable: _Optional[bool] = ..., error: _Optional[str] = ...) -> None: ...

class Cluster(_message.Message):
    __slots__ = ("nodes", "links")
    NODES_FIELD_NUMBER: _ClassVar[int]
    LINKS_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeProfile]
    links: _containers.RepeatedCompositeFieldContainer[Link]
    def __init__(self, nodes: _Optional[_Iterable[_Union[NodeProfile, _Mapping]]] = ..., links: _Optional[_Iterable[_Union[Link, _Mapping]]] = ...) -> None: ...

class Quantization(_message.Message):
    __slots__ = ("mode", "bits", "group_size")
    MODE_FIELD_NUMBER: _ClassVar[int]
    BITS_FIELD_NUMBER: _ClassVar[int]
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    mode: str
    bits: int
    group_size: int
    def __init__(self, mode: _Optional[str] = ..., bits: _Optional[int] = ..., group_size: _Optional[int] = ...) -> None: ...

class SplitRule(_message.Message):
    __slots__ = ("axis", "units", "unit")
    AXIS_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    axis: int
    units: int
    unit: str
    def __init__(self, axis: _Optional[int] = ..., units: _Optional[int] = ..., unit: _Optional[str] = ...) -> None: ...

class TensorInfo(_message.Message):
    __slots__ = ("name", "shape", "dtype", "quantization", "bytes", "tensor_class", "layer", "tensor_split", "moe_tensor_split", "parameters", "moe_experts_split")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    TENSOR_CLASS_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    TENSOR_SPLIT_FIELD_NUMBER: _ClassVar[int]
    MOE_TENSOR_SPLIT_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    MOE_EXPERTS_SPLIT_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    quantization: Quantization
    bytes: int
    tensor_class: TensorClass
    layer: int
    tensor_split: SplitRule
    moe_tensor_split: SplitRule
    parameters: int
    moe_experts_split: SplitRule
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., quantization: _Optional[_Union[Quantization, _Mapping]] = ..., bytes: _Optional[int] = ..., tensor_class: _Optional[_Union[TensorClass, str]] = ..., layer: _Optional[int] = ..., tensor_split: _Optional[_Union[SplitRule, _Mapping]] = ..., moe_tensor_split: _Optional[_Union[SplitRule, _Mapping]] = ..., parameters: _Optional[int] = ..., moe_experts_split: _Optional[_Union[SplitRule, _Mapping]] = ...) -> None: ...

class LayerKvCache(_message.Message):
    __slots__ = ("layer", "bytes_per_token", "window_tokens", "split_units", "kind")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    BYTES_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    WINDOW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SPLIT_UNITS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    layer: int
    bytes_per_token: float
    window_tokens: int
    split_units: int
    kind: str
    def __init__(self, layer: _Optional[int] = ..., bytes_per_token: _Optional[float] = ..., window_tokens: _Optional[int] = ..., split_units: _Optional[int] = ..., kind: _Optional[str] = ...) -> None: ...

class ModelSpec(_message.Message):
    __slots__ = ("model_id", "model_type", "source", "dtype", "num_layers", "max_context", "hidden_size", "vocab_size", "num_experts", "experts_per_token", "tensors", "kv_cache", "total_bytes", "total_parameters", "active_parameters_per_token", "proven_strategies", "notes", "refused_strategies", "unbatched", "unbatched_pipeline")
    class RefusedStrategiesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_PARAMETERS_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PROVEN_STRATEGIES_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    REFUSED_STRATEGIES_FIELD_NUMBER: _ClassVar[int]
    UNBATCHED_FIELD_NUMBER: _ClassVar[int]
    UNBATCHED_PIPELINE_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    model_type: str
    source: str
    dtype: str
    num_layers: int
    max_context: int
    hidden_size: int
    vocab_size: int
    num_experts: int
    experts_per_token: int
    tensors: _containers.RepeatedCompositeFieldContainer[TensorInfo]
    kv_cache: _containers.RepeatedCompositeFieldContainer[LayerKvCache]
    total_bytes: int
    total_parameters: int
    active_parameters_per_token: int
    proven_strategies: _containers.RepeatedScalarFieldContainer[str]
    notes: _containers.RepeatedScalarFieldContainer[str]
    refused_strategies: _containers.ScalarMap[str, str]
    unbatched: bool
    unbatched_pipeline: bool
    def __init__(self, model_id: _Optional[str] = ..., model_type: _Optional[str] = ..., source: _Optional[str] = ..., dtype: _Optional[str] = ..., num_layers: _Optional[int] = ..., max_context: _Optional[int] = ..., hidden_size: _Optional[int] = ..., vocab_size: _Optional[int] = ..., num_experts: _Optional[int] = ..., experts_per_token: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TensorInfo, _Mapping]]] = ..., kv_cache: _Optional[_Iterable[_Union[LayerKvCache, _Mapping]]] = ..., total_bytes: _Optional[int] = ..., total_parameters: _Optional[int] = ..., active_parameters_per_token: _Optional[int] = ..., proven_strategies: _Optional[_Iterable[str]] = ..., notes: _Optional[_Iterable[str]] = ..., refused_strategies: _Optional[_Mapping[str, str]] = ..., unbatched: _Optional[bool] = ..., unbatched_pipeline: _Optional[bool] = ...) -> None: ...

class MemoryBreakdown(_message.Message):
    __slots__ = ("embedding_bytes", "lm_head_bytes", "attention_bytes", "dense_mlp_bytes", "router_bytes", "routed_experts_bytes", "shared_experts_bytes", "norm_bytes", "other_bytes", "weights_bytes", "kv_cache_bytes", "overhead_bytes", "total_bytes", "prefix_cache_bytes")
    EMBEDDING_BYTES_FIELD_NUMBER: _ClassVar[int]
    LM_HEAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_BYTES_FIELD_NUMBER: _ClassVar[int]
    DENSE_MLP_BYTES_FIELD_NUMBER: _ClassVar[int]
    ROUTER_BYTES_FIELD_NUMBER: _ClassVar[int]
    ROUTED_EXPERTS_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHARED_EXPERTS_BYTES_FIELD_NUMBER: _ClassVar[int]
    NORM_BYTES_FIELD_NUMBER: _ClassVar[int]
    OTHER_BYTES_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    OVERHEAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    embedding_bytes: int
    lm_head_bytes: int
    attention_bytes: int
    dense_mlp_bytes: int
    router_bytes: int
    routed_experts_bytes: int
    shared_experts_bytes: int
    norm_bytes: int
    other_bytes: int
    weights_bytes: int
    kv_cache_bytes: int
    overhead_bytes: int
    total_bytes: int
    prefix_cache_bytes: int
    def __init__(self, embedding_bytes: _Optional[int] = ..., lm_head_bytes: _Optional[int] = ..., attention_bytes: _Optional[int] = ..., dense_mlp_bytes: _Optional[int] = ..., router_bytes: _Optional[int] = ..., routed_experts_bytes: _Optional[int] = ..., shared_experts_bytes: _Optional[int] = ..., norm_bytes: _Optional[int] = ..., other_bytes: _Optional[int] = ..., weights_bytes: _Optional[int] = ..., kv_cache_bytes: _Optional[int] = ..., overhead_bytes: _Optional[int] = ..., total_bytes: _Optional[int] = ..., prefix_cache_bytes: _Optional[int] = ...) -> None: ...

class RankPlacement(_message.Message):
    __slots__ = ("rank", "node_id", "node_name", "layer_start", "layer_end", "memory", "usable_bytes", "fits", "predicted_compute_s", "address", "transfer", "share", "share_of")
    RANK_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    USABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    FITS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    SHARE_OF_FIELD_NUMBER: _ClassVar[int]
    rank: int
    node_id: str
    node_name: str
    layer_start: int
    layer_end: int
    memory: MemoryBreakdown
    usable_bytes: int
    fits: bool
    predicted_compute_s: float
    address: str
    transfer: Transfer
    share: int
    share_of: int
    def __init__(self, rank: _Optional[int] = ..., node_id: _Optional[str] = ..., node_name: _Optional[str] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., memory: _Optional[_Union[MemoryBreakdown, _Mapping]] = ..., usable_bytes: _Optional[int] = ..., fits: _Optional[bool] = ..., predicted_compute_s: _Optional[float] = ..., address: _Optional[str] = ..., transfer: _Optional[_Union[Transfer, _Mapping]] = ..., share: _Optional[int] = ..., share_of: _Optional[int] = ...) -> None: ...

class Transfer(_message.Message):
    __slots__ = ("bytes_needed", "bytes_local", "bytes_to_fetch", "sources", "predicted_s")
    BYTES_NEEDED_FIELD_NUMBER: _ClassVar[int]
    BYTES_LOCAL_FIELD_NUMBER: _ClassVar[int]
    BYTES_TO_FETCH_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_S_FIELD_NUMBER: _ClassVar[int]
    bytes_needed: int
    bytes_local: int
    bytes_to_fetch: int
    sources: _containers.RepeatedScalarFieldContainer[str]
    predicted_s: float
    def __init__(self, bytes_needed: _Optional[int] = ..., bytes_local: _Optional[int] = ..., bytes_to_fetch: _Optional[int] = ..., sources: _Optional[_Iterable[str]] = ..., predicted_s: _Optional[float] = ...) -> None: ...

class PlacementRequest(_message.Message):
    __slots__ = ("model", "context_length", "concurrency", "strategy", "backend", "nodes", "headroom_fraction", "ranks", "restart_policy", "max_restarts", "prefix_cache_bytes")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    HEADROOM_FRACTION_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    RESTART_POLICY_FIELD_NUMBER: _ClassVar[int]
    MAX_RESTARTS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    model: str
    context_length: int
    concurrency: int
    strategy: Strategy
    backend: Backend
    nodes: _containers.RepeatedScalarFieldContainer[str]
    headroom_fraction: float
    ranks: int
    restart_policy: RestartPolicy
    max_restarts: int
    prefix_cache_bytes: int
    def __init__(self, model: _Optional[str] = ..., context_length: _Optional[int] = ..., concurrency: _Optional[int] = ..., strategy: _Optional[_Union[Strategy, str]] = ..., backend: _Optional[_Union[Backend, str]] = ..., nodes: _Optional[_Iterable[str]] = ..., headroom_fraction: _Optional[float] = ..., ranks: _Optional[int] = ..., restart_policy: _Optional[_Union[RestartPolicy, str]] = ..., max_restarts: _Optional[int] = ..., prefix_cache_bytes: _Optional[int] = ...) -> None: ...

class Placement(_message.Message):
    __slots__ = ("model_id", "strategy", "backend", "ranks", "fits", "predicted_decode_tokens_per_s", "predicted_compute_s", "predicted_communication_s", "reasons", "context_length", "concurrency", "rejected", "bytes_to_fetch", "predicted_transfer_s", "revision", "prefix_cache_tokens", "expert_layout", "predicted_routing_imbalance", "stage_ranks", "stage_strategy")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    FITS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_DECODE_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_COMMUNICATION_S_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    BYTES_TO_FETCH_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_TRANSFER_S_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_ROUTING_IMBALANCE_FIELD_NUMBER: _ClassVar[int]
    STAGE_RANKS_FIELD_NUMBER: _ClassVar[int]
    STAGE_STRATEGY_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    strategy: Strategy
    backend: Backend
    ranks: _containers.RepeatedCompositeFieldContainer[RankPlacement]
    fits: bool
    predicted_decode_tokens_per_s: float
    predicted_compute_s: float
    predicted_communication_s: float
    reasons: _containers.RepeatedScalarFieldContainer[str]
    context_length: int
    concurrency: int
    rejected: bool
    bytes_to_fetch: int
    predicted_transfer_s: float
    revision: str
    prefix_cache_tokens: int
    expert_layout: ExpertLayout
    predicted_routing_imbalance: float
    stage_ranks: _containers.RepeatedScalarFieldContainer[int]
    stage_strategy: Strategy
    def __init__(self, model_id: _Optional[str] = ..., strategy: _Optional[_Union[Strategy, str]] = ..., backend: _Optional[_Union[Backend, str]] = ..., ranks: _Optional[_Iterable[_Union[RankPlacement, _Mapping]]] = ..., fits: _Optional[bool] = ..., predicted_decode_tokens_per_s: _Optional[float] = ..., predicted_compute_s: _Optional[float] = ..., predicted_communication_s: _Optional[float] = ..., reasons: _Optional[_Iterable[str]] = ..., context_length: _Optional[int] = ..., concurrency: _Optional[int] = ..., rejected: _Optional[bool] = ..., bytes_to_fetch: _Optional[int] = ..., predicted_transfer_s: _Optional[float] = ..., revision: _Optional[str] = ..., prefix_cache_tokens: _Optional[int] = ..., expert_layout: _Optional[_Union[ExpertLayout, _Mapping]] = ..., predicted_routing_imbalance: _Optional[float] = ..., stage_ranks: _Optional[_Iterable[int]] = ..., stage_strategy: _Optional[_Union[Strategy, str]] = ...) -> None: ...

class ExpertLayout(_message.Message):
    __slots__ = ("layers",)
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.RepeatedCompositeFieldContainer[LayerExperts]
    def __init__(self, layers: _Optional[_Iterable[_Union[LayerExperts, _Mapping]]] = ...) -> None: ...

class LayerExperts(_message.Message):
    __slots__ = ("layer", "ranks")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    ranks: _containers.RepeatedCompositeFieldContainer[ExpertSet]
    def __init__(self, layer: _Optional[int] = ..., ranks: _Optional[_Iterable[_Union[ExpertSet, _Mapping]]] = ...) -> None: ...

class ExpertSet(_message.Message):
    __slots__ = ("experts",)
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    experts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, experts: _Optional[_Iterable[int]] = ...) -> None: ...

class ExpertCounts(_message.Message):
    __slots__ = ("layers",)
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.RepeatedCompositeFieldContainer[LayerCounts]
    def __init__(self, layers: _Optional[_Iterable[_Union[LayerCounts, _Mapping]]] = ...) -> None: ...

class LayerCounts(_message.Message):
    __slots__ = ("layer", "counts")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    counts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, layer: _Optional[int] = ..., counts: _Optional[_Iterable[int]] = ...) -> None: ...

class Plan(_message.Message):
    __slots__ = ("chosen", "candidates", "reasons")
    CHOSEN_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    chosen: Placement
    candidates: _containers.RepeatedCompositeFieldContainer[Placement]
    reasons: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, chosen: _Optional[_Union[Placement, _Mapping]] = ..., candidates: _Optional[_Iterable[_Union[Placement, _Mapping]]] = ..., reasons: _Optional[_Iterable[str]] = ...) -> None: ...

class Download(_message.Message):
    __slots__ = ("bytes_done", "bytes_total", "rate_bytes_per_s", "source", "eta_s", "deadline_s")
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    RATE_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    ETA_S_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_S_FIELD_NUMBER: _ClassVar[int]
    bytes_done: int
    bytes_total: int
    rate_bytes_per_s: float
    source: str
    eta_s: float
    deadline_s: float
    def __init__(self, bytes_done: _Optional[int] = ..., bytes_total: _Optional[int] = ..., rate_bytes_per_s: _Optional[float] = ..., source: _Optional[str] = ..., eta_s: _Optional[float] = ..., deadline_s: _Optional[float] = ...) -> None: ...

class RunnerStatus(_message.Message):
    __slots__ = ("instance_id", "rank", "node_id", "state", "layers_loaded", "total_layers", "reason", "diagnostics", "estimated_bytes", "peak_memory_bytes", "rss_bytes", "changed_at_unix_ms", "pid", "canary_max_delta", "canary_layer", "peak_rss_bytes", "history", "download", "max_batch", "batch_size", "queue_depth", "tokens_per_s", "generated_tokens", "prefix_cache", "peak_batch_size", "canary_seconds", "expert_counts")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_LOADED_FIELD_NUMBER: _ClassVar[int]
    TOTAL_LAYERS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DIAGNOSTICS_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_BYTES_FIELD_NUMBER: _ClassVar[int]
    PEAK_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHANGED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    CANARY_MAX_DELTA_FIELD_NUMBER: _ClassVar[int]
    CANARY_LAYER_FIELD_NUMBER: _ClassVar[int]
    PEAK_RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    DOWNLOAD_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_FIELD_NUMBER: _ClassVar[int]
    PEAK_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    CANARY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_COUNTS_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    rank: int
    node_id: str
    state: RunnerState
    layers_loaded: int
    total_layers: int
    reason: str
    diagnostics: str
    estimated_bytes: int
    peak_memory_bytes: int
    rss_bytes: int
    changed_at_unix_ms: int
    pid: int
    canary_max_delta: float
    canary_layer: int
    peak_rss_bytes: int
    history: _containers.RepeatedCompositeFieldContainer[StateChange]
    download: Download
    max_batch: int
    batch_size: int
    queue_depth: int
    tokens_per_s: float
    generated_tokens: int
    prefix_cache: PrefixCacheStats
    peak_batch_size: int
    canary_seconds: float
    expert_counts: ExpertCounts
    def __init__(self, instance_id: _Optional[str] = ..., rank: _Optional[int] = ..., node_id: _Optional[str] = ..., state: _Optional[_Union[RunnerState, str]] = ..., layers_loaded: _Optional[int] = ..., total_layers: _Optional[int] = ..., reason: _Optional[str] = ..., diagnostics: _Optional[str] = ..., estimated_bytes: _Optional[int] = ..., peak_memory_bytes: _Optional[int] = ..., rss_bytes: _Optional[int] = ..., changed_at_unix_ms: _Optional[int] = ..., pid: _Optional[int] = ..., canary_max_delta: _Optional[float] = ..., canary_layer: _Optional[int] = ..., peak_rss_bytes: _Optional[int] = ..., history: _Optional[_Iterable[_Union[StateChange, _Mapping]]] = ..., download: _Optional[_Union[Download, _Mapping]] = ..., max_batch: _Optional[int] = ..., batch_size: _Optional[int] = ..., queue_depth: _Optional[int] = ..., tokens_per_s: _Optional[float] = ..., generated_tokens: _Optional[int] = ..., prefix_cache: _Optional[_Union[PrefixCacheStats, _Mapping]] = ..., peak_batch_size: _Optional[int] = ..., canary_seconds: _Optional[float] = ..., expert_counts: _Optional[_Union[ExpertCounts, _Mapping]] = ...) -> None: ...

class StateChange(_message.Message):
    __slots__ = ("state", "at_unix_ms")
    STATE_FIELD_NUMBER: _ClassVar[int]
    AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    state: RunnerState
    at_unix_ms: int
    def __init__(self, state: _Optional[_Union[RunnerState, str]] = ..., at_unix_ms: _Optional[int] = ...) -> None: ...

class PrefixCacheStats(_message.Message):
    __slots__ = ("capacity_tokens", "capacity_bytes", "tokens", "bytes", "entries", "lookups", "hits", "prompt_tokens", "hit_tokens")
    CAPACITY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    LOOKUPS_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    HIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    capacity_tokens: int
    capacity_bytes: int
    tokens: int
    bytes: int
    entries: int
    lookups: int
    hits: int
    prompt_tokens: int
    hit_tokens: int
    def __init__(self, capacity_tokens: _Optional[int] = ..., capacity_bytes: _Optional[int] = ..., tokens: _Optional[int] = ..., bytes: _Optional[int] = ..., entries: _Optional[int] = ..., lookups: _Optional[int] = ..., hits: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., hit_tokens: _Optional[int] = ...) -> None: ...

class Instance(_message.Message):
    __slots__ = ("instance_id", "placement", "state", "reason", "runners", "created_at_unix_ms", "request", "restarts", "replaces", "replaced_by")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    RUNNERS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    REPLACES_FIELD_NUMBER: _ClassVar[int]
    REPLACED_BY_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    placement: Placement
    state: InstanceState
    reason: str
    runners: _containers.RepeatedCompositeFieldContainer[RunnerStatus]
    created_at_unix_ms: int
    request: PlacementRequest
    restarts: int
    replaces: str
    replaced_by: str
    def __init__(self, instance_id: _Optional[str] = ..., placement: _Optional[_Union[Placement, _Mapping]] = ..., state: _Optional[_Union[InstanceState, str]] = ..., reason: _Optional[str] = ..., runners: _Optional[_Iterable[_Union[RunnerStatus, _Mapping]]] = ..., created_at_unix_ms: _Optional[int] = ..., request: _Optional[_Union[PlacementRequest, _Mapping]] = ..., restarts: _Optional[int] = ..., replaces: _Optional[str] = ..., replaced_by: _Optional[str] = ...) -> None: ...

class RunnerDeadlines(_message.Message):
    __slots__ = ("connect_s", "load_s", "warmup_s", "peer_s")
    CONNECT_S_FIELD_NUMBER: _ClassVar[int]
    LOAD_S_FIELD_NUMBER: _ClassVar[int]
    WARMUP_S_FIELD_NUMBER: _ClassVar[int]
    PEER_S_FIELD_NUMBER: _ClassVar[int]
    connect_s: float
    load_s: float
    warmup_s: float
    peer_s: float
    def __init__(self, connect_s: _Optional[float] = ..., load_s: _Optional[float] = ..., warmup_s: _Optional[float] = ..., peer_s: _Optional[float] = ...) -> None: ...

class RunnerSpec(_message.Message):
    __slots__ = ("instance_id", "node_id", "rank", "world_size", "backend", "hosts", "coordinator", "rdma_devices", "model_dir", "strategy", "pipeline_layers", "deadlines", "estimated_bytes", "context_length", "rendezvous_secret", "max_batch", "prefix_cache_tokens", "prefix_cache_bytes", "max_queue", "shares", "prefill_step_tokens", "expert_layout", "stage_ranks", "stage_strategy")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    HOSTS_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_FIELD_NUMBER: _ClassVar[int]
    RDMA_DEVICES_FIELD_NUMBER: _ClassVar[int]
    MODEL_DIR_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_LAYERS_FIELD_NUMBER: _ClassVar[int]
    DEADLINES_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_BYTES_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    RENDEZVOUS_SECRET_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    PREFILL_STEP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    STAGE_RANKS_FIELD_NUMBER: _ClassVar[int]
    STAGE_STRATEGY_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    node_id: str
    rank: int
    world_size: int
    backend: Backend
    hosts: _containers.RepeatedScalarFieldContainer[str]
    coordinator: str
    rdma_devices: _containers.RepeatedScalarFieldContainer[str]
    model_dir: str
    strategy: str
    pipeline_layers: _containers.RepeatedScalarFieldContainer[int]
    deadlines: RunnerDeadlines
    estimated_bytes: int
    context_length: int
    rendezvous_secret: str
    max_batch: int
    prefix_cache_tokens: int
    prefix_cache_bytes: int
    max_queue: int
    shares: _containers.RepeatedScalarFieldContainer[int]
    prefill_step_tokens: int
    expert_layout: ExpertLayout
    stage_ranks: _containers.RepeatedScalarFieldContainer[int]
    stage_strategy: str
    def __init__(self, instance_id: _Optional[str] = ..., node_id: _Optional[str] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., backend: _Optional[_Union[Backend, str]] = ..., hosts: _Optional[_Iterable[str]] = ..., coordinator: _Optional[str] = ..., rdma_devices: _Optional[_Iterable[str]] = ..., model_dir: _Optional[str] = ..., strategy: _Optional[str] = ..., pipeline_layers: _Optional[_Iterable[int]] = ..., deadlines: _Optional[_Union[RunnerDeadlines, _Mapping]] = ..., estimated_bytes: _Optional[int] = ..., context_length: _Optional[int] = ..., rendezvous_secret: _Optional[str] = ..., max_batch: _Optional[int] = ..., prefix_cache_tokens: _Optional[int] = ..., prefix_cache_bytes: _Optional[int] = ..., max_queue: _Optional[int] = ..., shares: _Optional[_Iterable[int]] = ..., prefill_step_tokens: _Optional[int] = ..., expert_layout: _Optional[_Union[ExpertLayout, _Mapping]] = ..., stage_ranks: _Optional[_Iterable[int]] = ..., stage_strategy: _Optional[str] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "min_p", "seed", "max_tokens", "stop", "logprobs", "top_logprobs", "ignore_eos")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    seed: int
    max_tokens: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    logprobs: bool
    top_logprobs: int
    ignore_eos: bool
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., min_p: _Optional[float] = ..., seed: _Optional[int] = ..., max_tokens: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., logprobs: _Optional[bool] = ..., top_logprobs: _Optional[int] = ..., ignore_eos: _Optional[bool] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "messages", "prompt_tokens", "sampling", "return_prompt_logits", "prompt")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    RETURN_PROMPT_LOGITS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    prompt_tokens: _containers.RepeatedScalarFieldContainer[int]
    sampling: SamplingParams
    return_prompt_logits: bool
    prompt: str
    def __init__(self, request_id: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., prompt_tokens: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., return_prompt_logits: _Optional[bool] = ..., prompt: _Optional[str] = ...) -> None: ...

class TokenLogprob(_message.Message):
    __slots__ = ("token", "text", "logprob", "raw")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    token: int
    text: str
    logprob: float
    raw: bytes
    def __init__(self, token: _Optional[int] = ..., text: _Optional[str] = ..., logprob: _Optional[float] = ..., raw: _Optional[bytes] = ...) -> None: ...

class GeneratedToken(_message.Message):
    __slots__ = ("token", "text", "logprob", "top_logprobs", "raw")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    token: int
    text: str
    logprob: float
    top_logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    raw: bytes
    def __init__(self, token: _Optional[int] = ..., text: _Optional[str] = ..., logprob: _Optional[float] = ..., top_logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ..., raw: _Optional[bytes] = ...) -> None: ...

class GenerationChunk(_message.Message):
    __slots__ = ("request_id", "tokens", "finish_reason", "error", "prompt_tokens", "generation_tokens", "prompt_tokens_per_s", "generation_tokens_per_s", "prompt_logits", "error_kind", "admitted", "cached_tokens", "stop_sequence")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    GENERATION_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGITS_FIELD_NUMBER: _ClassVar[int]
    ERROR_KIND_FIELD_NUMBER: _ClassVar[int]
    ADMITTED_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    tokens: _containers.RepeatedCompositeFieldContainer[GeneratedToken]
    finish_reason: FinishReason
    error: str
    prompt_tokens: int
    generation_tokens: int
    prompt_tokens_per_s: float
    generation_tokens_per_s: float
    prompt_logits: _containers.RepeatedScalarFieldContainer[float]
    error_kind: ErrorKind
    admitted: bool
    cached_tokens: int
    stop_sequence: str
    def __init__(self, request_id: _Optional[str] = ..., tokens: _Optional[_Iterable[_Union[GeneratedToken, _Mapping]]] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., error: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., generation_tokens: _Optional[int] = ..., prompt_tokens_per_s: _Optional[float] = ..., generation_tokens_per_s: _Optional[float] = ..., prompt_logits: _Optional[_Iterable[float]] = ..., error_kind: _Optional[_Union[ErrorKind, str]] = ..., admitted: _Optional[bool] = ..., cached_tokens: _Optional[int] = ..., stop_sequence: _Optional[str] = ...) -> None: ...

class CancelRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class ShutdownRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RunnerCommand(_message.Message):
    __slots__ = ("generate", "cancel", "shutdown", "start")
    GENERATE_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    SHUTDOWN_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    generate: GenerateRequest
    cancel: CancelRequest
    shutdown: ShutdownRequest
    start: RunnerSpec
    def __init__(self, generate: _Optional[_Union[GenerateRequest, _Mapping]] = ..., cancel: _Optional[_Union[CancelRequest, _Mapping]] = ..., shutdown: _Optional[_Union[ShutdownRequest, _Mapping]] = ..., start: _Optional[_Union[RunnerSpec, _Mapping]] = ...) -> None: ...

class RunnerEvent(_message.Message):
    __slots__ = ("status", "chunk")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    status: RunnerStatus
    chunk: GenerationChunk
    def __init__(self, status: _Optional[_Union[RunnerStatus, _Mapping]] = ..., chunk: _Optional[_Union[GenerationChunk, _Mapping]] = ...) -> None: ...

class NodeRecord(_message.Message):
    __slots__ = ("profile", "version", "incarnation", "cluster_id", "protocol_version", "grpc_addresses", "api_address", "public_key", "signature")
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    GRPC_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    API_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    profile: NodeProfile
    version: int
    incarnation: int
    cluster_id: str
    protocol_version: int
    grpc_addresses: _containers.RepeatedScalarFieldContainer[str]
    api_address: str
    public_key: bytes
    signature: bytes
    def __init__(self, profile: _Optional[_Union[NodeProfile, _Mapping]] = ..., version: _Optional[int] = ..., incarnation: _Optional[int] = ..., cluster_id: _Optional[str] = ..., protocol_version: _Optional[int] = ..., grpc_addresses: _Optional[_Iterable[str]] = ..., api_address: _Optional[str] = ..., public_key: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class LinkRecord(_message.Message):
    __slots__ = ("link", "version", "signature")
    LINK_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    link: Link
    version: int
    signature: bytes
    def __init__(self, link: _Optional[_Union[Link, _Mapping]] = ..., version: _Optional[int] = ..., signature: _Optional[bytes] = ...) -> None: ...

class NodeState(_message.Message):
    __slots__ = ("record", "status", "last_seen_unix_ms", "memory_available_bytes", "memory_reserved_bytes")
    RECORD_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_RESERVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    record: NodeRecord
    status: NodeStatus
    last_seen_unix_ms: int
    memory_available_bytes: int
    memory_reserved_bytes: int
    def __init__(self, record: _Optional[_Union[NodeRecord, _Mapping]] = ..., status: _Optional[_Union[NodeStatus, str]] = ..., last_seen_unix_ms: _Optional[int] = ..., memory_available_bytes: _Optional[int] = ..., memory_reserved_bytes: _Optional[int] = ...) -> None: ...

class ClusterState(_message.Message):
    __slots__ = ("cluster_id", "self_id", "nodes", "links", "instances", "strangers")
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    SELF_ID_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    LINKS_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    STRANGERS_FIELD_NUMBER: _ClassVar[int]
    cluster_id: str
    self_id: str
    nodes: _containers.RepeatedCompositeFieldContainer[NodeState]
    links: _containers.RepeatedCompositeFieldContainer[Link]
    instances: _containers.RepeatedCompositeFieldContainer[Instance]
    strangers: _containers.RepeatedCompositeFieldContainer[Stranger]
    def __init__(self, cluster_id: _Optional[str] = ..., self_id: _Optional[str] = ..., nodes: _Optional[_Iterable[_Union[NodeState, _Mapping]]] = ..., links: _Optional[_Iterable[_Union[Link, _Mapping]]] = ..., instances: _Optional[_Iterable[_Union[Instance, _Mapping]]] = ..., strangers: _Optional[_Iterable[_Union[Stranger, _Mapping]]] = ...) -> None: ...

class Stranger(_message.Message):
    __slots__ = ("address", "node_id", "reason", "first_seen_unix_ms", "last_seen_unix_ms")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    FIRST_SEEN_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    address: str
    node_id: str
    reason: str
    first_seen_unix_ms: int
    last_seen_unix_ms: int
    def __init__(self, address: _Optional[str] = ..., node_id: _Optional[str] = ..., reason: _Optional[str] = ..., first_seen_unix_ms: _Optional[int] = ..., last_seen_unix_ms: _Optional[int] = ...) -> None: ...

class ExchangeRequest(_message.Message):
    __slots__ = ("sender", "nodes", "links", "work")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    LINKS_FIELD_NUMBER: _ClassVar[int]
    WORK_FIELD_NUMBER: _ClassVar[int]
    sender: NodeRecord
    nodes: _containers.RepeatedCompositeFieldContainer[NodeRecord]
    links: _containers.RepeatedCompositeFieldContainer[LinkRecord]
    work: _containers.RepeatedCompositeFieldContainer[WorkRecord]
    def __init__(self, sender: _Optional[_Union[NodeRecord, _Mapping]] = ..., nodes: _Optional[_Iterable[_Union[NodeRecord, _Mapping]]] = ..., links: _Optional[_Iterable[_Union[LinkRecord, _Mapping]]] = ..., work: _Optional[_Iterable[_Union[WorkRecord, _Mapping]]] = ...) -> None: ...

class ExchangeResponse(_message.Message):
    __slots__ = ("responder", "nodes", "links", "work")
    RESPONDER_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    LINKS_FIELD_NUMBER: _ClassVar[int]
    WORK_FIELD_NUMBER: _ClassVar[int]
    responder: NodeRecord
    nodes: _containers.RepeatedCompositeFieldContainer[NodeRecord]
    links: _containers.RepeatedCompositeFieldContainer[LinkRecord]
    work: _containers.RepeatedCompositeFieldContainer[WorkRecord]
    def __init__(self, responder: _Optional[_Union[NodeRecord, _Mapping]] = ..., nodes: _Optional[_Iterable[_Union[NodeRecord, _Mapping]]] = ..., links: _Optional[_Iterable[_Union[LinkRecord, _Mapping]]] = ..., work: _Optional[_Iterable[_Union[WorkRecord, _Mapping]]] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("node_id", "incarnation", "version", "cluster_id", "memory_available_bytes", "memory_reserved_bytes")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    MEMORY_AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_RESERVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    incarnation: int
    version: int
    cluster_id: str
    memory_available_bytes: int
    memory_reserved_bytes: int
    def __init__(self, node_id: _Optional[str] = ..., incarnation: _Optional[int] = ..., version: _Optional[int] = ..., cluster_id: _Optional[str] = ..., memory_available_bytes: _Optional[int] = ..., memory_reserved_bytes: _Optional[int] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("node_id", "incarnation", "version", "memory_available_bytes", "memory_reserved_bytes")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MEMORY_AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_RESERVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    incarnation: int
    version: int
    memory_available_bytes: int
    memory_reserved_bytes: int
    def __init__(self, node_id: _Optional[str] = ..., incarnation: _Optional[int] = ..., version: _Optional[int] = ..., memory_available_bytes: _Optional[int] = ..., memory_reserved_bytes: _Optional[int] = ...) -> None: ...

class Reservation(_message.Message):
    __slots__ = ("reservation_id", "instance_id", "rank", "bytes", "expires_at_unix_ms", "owner_node_id")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    OWNER_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    instance_id: str
    rank: int
    bytes: int
    expires_at_unix_ms: int
    owner_node_id: str
    def __init__(self, reservation_id: _Optional[str] = ..., instance_id: _Optional[str] = ..., rank: _Optional[int] = ..., bytes: _Optional[int] = ..., expires_at_unix_ms: _Optional[int] = ..., owner_node_id: _Optional[str] = ...) -> None: ...

class ReserveRequest(_message.Message):
    __slots__ = ("reservation",)
    RESERVATION_FIELD_NUMBER: _ClassVar[int]
    reservation: Reservation
    def __init__(self, reservation: _Optional[_Union[Reservation, _Mapping]] = ...) -> None: ...

class ReserveResponse(_message.Message):
    __slots__ = ("admitted", "reason", "usable_bytes", "reserved_bytes", "port")
    ADMITTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    USABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESERVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    admitted: bool
    reason: str
    usable_bytes: int
    reserved_bytes: int
    port: int
    def __init__(self, admitted: _Optional[bool] = ..., reason: _Optional[str] = ..., usable_bytes: _Optional[int] = ..., reserved_bytes: _Optional[int] = ..., port: _Optional[int] = ...) -> None: ...

class StartRunnerRequest(_message.Message):
    __slots__ = ("spec", "reservation_id", "model", "revision")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    spec: RunnerSpec
    reservation_id: str
    model: str
    revision: str
    def __init__(self, spec: _Optional[_Union[RunnerSpec, _Mapping]] = ..., reservation_id: _Optional[str] = ..., model: _Optional[str] = ..., revision: _Optional[str] = ...) -> None: ...

class StartRunnerResponse(_message.Message):
    __slots__ = ("started", "reason")
    STARTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    started: bool
    reason: str
    def __init__(self, started: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class StopInstanceRequest(_message.Message):
    __slots__ = ("instance_id",)
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    def __init__(self, instance_id: _Optional[str] = ...) -> None: ...

class StopInstanceResponse(_message.Message):
    __slots__ = ("stopped",)
    STOPPED_FIELD_NUMBER: _ClassVar[int]
    stopped: int
    def __init__(self, stopped: _Optional[int] = ...) -> None: ...

class GenerateOnInstance(_message.Message):
    __slots__ = ("instance_id", "request")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    request: GenerateRequest
    def __init__(self, instance_id: _Optional[str] = ..., request: _Optional[_Union[GenerateRequest, _Mapping]] = ...) -> None: ...

class CancelResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkRecord(_message.Message):
    __slots__ = ("node_id", "version", "runners", "instances", "signature")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RUNNERS_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    version: int
    runners: _containers.RepeatedCompositeFieldContainer[RunnerStatus]
    instances: _containers.RepeatedCompositeFieldContainer[Instance]
    signature: bytes
    def __init__(self, node_id: _Optional[str] = ..., version: _Optional[int] = ..., runners: _Optional[_Iterable[_Union[RunnerStatus, _Mapping]]] = ..., instances: _Optional[_Iterable[_Union[Instance, _Mapping]]] = ..., signature: _Optional[bytes] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("reservation_id",)
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    def __init__(self, reservation_id: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: _Optional[bool] = ...) -> None: ...

class PingRequest(_message.Message):
    __slots__ = ("payload",)
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    def __init__(self, payload: _Optional[bytes] = ...) -> None: ...

class PingResponse(_message.Message):
    __slots__ = ("payload", "node_id")
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    node_id: str
    def __init__(self, payload: _Optional[bytes] = ..., node_id: _Optional[str] = ...) -> None: ...

class ThroughputChunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class ThroughputResult(_message.Message):
    __slots__ = ("bytes",)
    BYTES_FIELD_NUMBER: _ClassVar[int]
    bytes: int
    def __init__(self, bytes: _Optional[int] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("node_id", "incarnation")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    incarnation: int
    def __init__(self, node_id: _Optional[str] = ..., incarnation: _Optional[int] = ...) -> None: ...

class LeaveResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ByteRange(_message.Message):
    __slots__ = ("offset", "length", "stride", "count", "skip")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    SKIP_FIELD_NUMBER: _ClassVar[int]
    offset: int
    length: int
    stride: int
    count: int
    skip: int
    def __init__(self, offset: _Optional[int] = ..., length: _Optional[int] = ..., stride: _Optional[int] = ..., count: _Optional[int] = ..., skip: _Optional[int] = ...) -> None: ...

class ReadFileRequest(_message.Message):
    __slots__ = ("model_id", "revision", "file", "ranges")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    RANGES_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    revision: str
    file: str
    ranges: _containers.RepeatedCompositeFieldContainer[ByteRange]
    def __init__(self, model_id: _Optional[str] = ..., revision: _Optional[str] = ..., file: _Optional[str] = ..., ranges: _Optional[_Iterable[_Union[ByteRange, _Mapping]]] = ...) -> None: ...

class FileChunk(_message.Message):
    __slots__ = ("range", "position", "data", "sha256")
    RANGE_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    range: int
    position: int
    data: bytes
    sha256: bytes
    def __init__(self, range: _Optional[int] = ..., position: _Optional[int] = ..., data: _Optional[bytes] = ..., sha256: _Optional[bytes] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class PullProgress(_message.Message):
    __slots__ = ("model_id", "revision", "download", "done", "error")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    DOWNLOAD_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    revision: str
    download: Download
    done: bool
    error: str
    def __init__(self, model_id: _Optional[str] = ..., revision: _Optional[str] = ..., download: _Optional[_Union[Download, _Mapping]] = ..., done: _Optional[bool] = ..., error: _Optional[str] = ...) -> None: ...

class StateRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListInstancesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InstanceList(_message.Message):
    __slots__ = ("instances",)
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    instances: _containers.RepeatedCompositeFieldContainer[Instance]
    def __init__(self, instances: _Optional[_Iterable[_Union[Instance, _Mapping]]] = ...) -> None: ...

class InstanceRef(_message.Message):
    __slots__ = ("instance_id",)
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    def __init__(self, instance_id: _Optional[str] = ...) -> None: ...

class DeleteInstanceResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: str
    def __init__(self, deleted: _Optional[str] = ...) -> None: ...
