"""The tensor inventory of a model, from a directory, a config.json or a card.

Each source ends in the same ModelSpec: every tensor with its shape, stored
dtype, quantization, bytes, class, layer and how each strategy cuts it, plus the
architecture's KV-cache parts. Only headers and configs are read, never weights.
"""

import json
import math
import re
from pathlib import Path
from typing import Optional

from exod.proto import exod_pb2 as pb

from . import architectures, quantization
from .architectures.base import STRATEGIES, split_rule, strategy_refusal
from .errors import ModelError
from .safetensors_header import read_header

REQUIRED_FIELDS = ("model_type", "num_hidden_layers", "hidden_size", "vocab_size")
SIDE_AXIS = {"rows": -2, "cols": -1, "axis0": 0}


def normalize_config(config: dict, where: str) -> dict:
    if not isinstance(config, dict):
        raise ModelError(f"{where}: config is not a JSON object")
    if isinstance(config.get("text_config"), dict):
        config = {**config["text_config"], **{k: v for k, v in config.items() if k != "text_config"}}
    missing = [f for f in REQUIRED_FIELDS if config.get(f) is None]
    if missing:
        raise ModelError(f"{where}: config.json lacks {', '.join(missing)}")
    for f in ("num_hidden_layers", "hidden_size", "vocab_size"):
        if not isinstance(config[f], int) or config[f] <= 0:
            raise ModelError(f"{where}: config.json field {f} must be a positive integer")
    return config


def checkpoint_dtype(config: dict) -> str:
    dtype = config.get("torch_dtype") or config.get("dtype") or "bfloat16"
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ModelError(f"unsupported checkpoint dtype {dtype!r}")
    return dtype


def compile_rules(overrides: list) -> list:
    rules = []
    for rule in overrides or []:
        rules.append((re.compile(rule["match"]), rule["params"]))
    return rules


# ------------------------------------------------------------------ sources


def from_directory(path: Path, model_id: Optional[str] = None) -> pb.ModelSpec:
    """Exact inventory from config.json and the safetensors headers."""
    path = Path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelError(f"{path}: no config.json")
    config = normalize_config(_read_json(config_path), str(config_path))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{path}: no .safetensors files")
    stored = {}
    for f in files:
        stored.update(read_header(f))
    return from_parts(model_id or path.name, config, stored, str(config_path))


def from_parts(model_id: str, config: dict, stored: dict, where: str = "", source: str = "directory") -> pb.ModelSpec:
    """Exact inventory from a config and the safetensors headers' entries
    ({name: (dtype, shape, bytes)}), wherever they were read: a directory,
    or a peer that holds the checkpoint (no weights needed here)."""
    config = normalize_config(config, where or model_id)
    quant = config.get("quantization")
    default = quantization.default_params(quant) if quant else None
    entries = []
    for name, (dtype, shape, nbytes) in stored.items():
        module, _ = architectures.module_of(name)
        params = None
        if quant and f"{module}.scales" in stored:
            explicit = quantization.recipe_for(module, quant, [])
            params = explicit if isinstance(explicit, dict) else default
        entries.append((name, shape, dtype, nbytes, params))
    return build_spec(model_id, config, source, entries)


def from_config(config: dict, model_id: str, overrides: Optional[list] = None) -> pb.ModelSpec:
    """Shapes from mlx-lm's own class for the model type, built lazily."""
    config = normalize_config(config, model_id)
    entries = lazy_model_entries(config, compile_rules(overrides))
    if entries is None:
        raise ModelError(f"{model_id}: mlx-lm has no model class for model_type {config['model_type']!r}")
    return build_spec(model_id, config, "config", entries)


def from_card(card: dict) -> pb.ModelSpec:
    config = normalize_config(dict(card["config"]), card["id"])
    rules = compile_rules(card.get("quantization_overrides"))
    entries = None
    if not card.get("architecture"):
        entries = lazy_model_entries(config, rules)
    if entries is None:
        if not card.get("architecture"):
            raise ModelError(f"{card['id']}: mlx-lm has no class for {config['model_type']!r} and the card describes no architecture")
        entries = described_entries(card["architecture"], config, rules)
    spec = build_spec(card["id"], config, "catalog", entries)
    return spec


# ------------------------------------------------------------------ lazy mlx-lm build


def lazy_model_entries(config: dict, rules: list):
    """Build mlx-lm's model for this config without allocating its weights,
    cast to the checkpoint dtype (a lazily built model is float32, which would
    overstate scales and unquantized tensors), then quantize as the checkpoint
    was. Returns None when mlx-lm has no class for the model type."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    try:
        model_class, args_class = _get_classes(config)
    except ValueError:
        return None
    try:
        model = model_class(args_class.from_dict(config))
    except (KeyError, TypeError, ValueError) as e:
        # A dataclass missing constructor arguments: name the config fields.
        missing = re.findall(r"'(\w+)'", str(e).partition("argument")[2]) if isinstance(e, TypeError) else []
        if missing:
            raise ModelError(f"config.json lacks {', '.join(missing)} (needed by {config['model_type']})") from None
        raise ModelError(f"config does not build a {config['model_type']} model: {e}") from None
    from .synthetic import cast

    cast(model, getattr(mx, checkpoint_dtype(config)))
    quant = config.get("quantization")
    if quant:
        default = quantization.default_params(quant)
        own_predicate = getattr(model, "quant_predicate", None)

        def predicate(path, module):
            explicit = quantization.recipe_for(path, quant, rules)
            if explicit is not None:
                return explicit if hasattr(module, "to_quantized") else False
            if not hasattr(module, "to_quantized"):
                return False
            if module.weight.shape[-1] % default["group_size"]:
                return False
            return own_predicate(path, module) if own_predicate else True

        nn.quantize(model, default["group_size"], default["bits"], mode=default["mode"], class_predicate=predicate)

    quantized = {
        name: {"mode": m.mode, "bits": m.bits, "group_size": m.group_size}
        for name, m in model.named_modules()
        if hasattr(m, "bits") and hasattr(m, "group_size")
    }
    entries = []
    for name, value in tree_flatten(model.parameters()):
        module, suffix = architectures.module_of(name)
        params = quantized.get(module) if suffix in ("weight", "scales", "biases") else None
        dtype = str(value.dtype).removeprefix("mlx.core.")
        entries.append((name, tuple(value.shape), dtype, value.nbytes, params))
    return entries


# ------------------------------------------------------------------ card descriptions

_EXPR = re.compile(r"^[\w\s+\-*/()]+$")


def evaluate(expr, config: dict) -> int:
    """An integer or arithmetic over config keys: + - * // and parentheses."""
    if isinstance(expr, int):
        return expr
    if not isinstance(expr, str) or not _EXPR.match(expr):
        raise ModelError(f"bad shape expression {expr!r}")
    names = {k: v for k, v in config.items() if isinstance(v, int) and not isinstance(v, bool)}
    try:
        value = eval(compile(expr, "<shape>", "eval"), {"__builtins__": {}}, names)  # noqa: S307
    except NameError as e:
        raise ModelError(f"shape expression {expr!r}: config lacks {e.name}") from None
    except (SyntaxError, ZeroDivisionError, TypeError):
        raise ModelError(f"bad shape expression {expr!r}") from None
    return int(value)


def _layers(spec, config: dict) -> list[int]:
    if spec is None:
        return [-1]
    if spec == "all":
        return list(range(config["num_hidden_layers"]))
    if isinstance(spec, dict):
        return list(range(evaluate(spec["from"], config), evaluate(spec["to"], config)))
    return [int(i) for i in spec]


def described_entries(architecture: dict, config: dict, rules: list):
    dtype = checkpoint_dtype(config)
    quant = config.get("quantization")
    default = quantization.default_params(quant) if quant else None
    entries = []
    for tensor in architecture["tensors"]:
        shape = tuple(evaluate(d, config) for d in tensor["shape"])
        for layer in _layers(tensor.get("layers"), config):
            name = tensor["name"].replace("{layer}", str(layer))
            module, _ = architectures.module_of(name)
            params = None
            if tensor.get("quantize") and quant:
                explicit = quantization.recipe_for(module, quant, rules)
                params = explicit if explicit is not None else default
                if params and shape[-1] % params["group_size"]:
                    params = None
            if params:
                for stored in quantization.quantized_entries(name, shape, dtype, params):
                    entries.append((*stored, params))
            else:
                own = tensor.get("dtype", dtype)
                entries.append((name, shape, own, math.prod(shape) * quantization.DTYPE_BYTES[own], None))
    return entries


# ------------------------------------------------------------------ the spec


def build_spec(model_id: str, config: dict, source: str, entries) -> pb.ModelSpec:
    arch = architectures.for_model_type(config["model_type"])
    spec = pb.ModelSpec(
        model_id=model_id,
        model_type=config["model_type"],
        source=source,
        dtype=checkpoint_dtype(config),
        num_layers=config["num_hidden_layers"],
        max_context=int(config.get("max_position_embeddings") or 0),
        hidden_size=config["hidden_size"],
        vocab_size=config["vocab_size"],
        notes=list(arch.notes),
    )
    model_class = mlx_lm_class(config)
    paths = [architectures.module_of(entry[0])[0] for entry in entries]
    try:
        for strategy in STRATEGIES:
            refusal = strategy_refusal(strategy, arch, model_class, paths, config)
            if refusal:
                spec.refused_strategies[strategy] = refusal
            else:
                spec.proven_strategies.append(strategy)
        experts, per_token = arch.experts(config)
        for name, shape, dtype, nbytes, params in sorted(entries, key=lambda e: _natural(e[0])):
            spec.tensors.append(_tensor_info(arch, config, name, shape, dtype, nbytes, params))
        element = quantization.DTYPE_BYTES[spec.dtype]
        kv_parts = arch.kv_cache(config, element)
    except KeyError as e:
        raise ModelError(f"{model_id}: config.json lacks {e.args[0]} (needed by {arch.name})") from None
    spec.num_experts, spec.experts_per_token = experts, per_token
    if model_class is not None:
        try:
            spec.unbatched, spec.unbatched_pipeline = (not b for b in batching(config))
        except Exception:  # the class's own code: one that cannot be built fails the runner in Loading anyway
            pass
    for part in kv_parts:
        spec.kv_cache.append(
            pb.LayerKvCache(
                layer=part.layer,
                bytes_per_token=part.bytes_per_token,
                window_tokens=part.window_tokens,
                split_units=part.split_units,
                kind=part.kind,
            )
        )
    spec.total_bytes = sum(t.bytes for t in spec.tensors)
    spec.total_parameters = sum(t.parameters for t in spec.tensors)
    routed = sum(t.parameters for t in spec.tensors if t.tensor_class == pb.ROUTED_EXPERTS)
    embedding = sum(t.parameters for t in spec.tensors if t.tensor_class == pb.EMBEDDING)
    active = spec.total_parameters - embedding + embedding // max(spec.vocab_size, 1)
    if experts:
        active -= routed - routed * per_token // experts
    spec.active_parameters_per_token = active
    return spec


def batching(config: dict) -> tuple[bool, bool]:
    """(batches, batches on pipeline stages): asked of the caches of the
    installed class's model, built from the config alone (its parameters
    stay lazy and are never allocated), as the runner will ask them."""
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import _get_classes

    from exod.runner.engine import serves_batched

    model_class, args_class = _get_classes(config)
    caches = make_prompt_cache(model_class(args_class.from_dict(config)))
    return serves_batched(caches, pipeline=False), serves_batched(caches, pipeline=True)


def mlx_lm_class(config: dict):
    """The installed mlx-lm's model class for this config, or None."""
    from mlx_lm.utils import _get_classes

    try:
        return _get_classes(config)[0]
    except ValueError:
        return None


def _tensor_info(arch, config, name, shape, dtype, nbytes, params) -> pb.TensorInfo:
    module, suffix = architectures.module_of(name)
    info = pb.TensorInfo(
        name=name,
        shape=shape,
        dtype=dtype,
        bytes=nbytes,
        tensor_class=arch.classify(name),
        layer=architectures.layer_of(name),
    )
    parameters = math.prod(shape)
    if params:
        info.quantization.CopyFrom(pb.Quantization(**params))
        if suffix == "weight":
            parameters = parameters * 32 // params["bits"]
        elif suffix in ("scales", "biases"):
            parameters = 0
    info.parameters = parameters
    for field, split_of in (("tensor_split", arch.tensor_split), ("moe_tensor_split", arch.moe_tensor_split),
                            ("moe_experts_split", split_rule("moe_experts", arch))):
        split = split_of(module, config)
        if split is None:
            continue
        if split.side == "cols" and len(shape) < 2:
            continue  # an output bias is added once, after the all-sum
        getattr(info, field).CopyFrom(
            pb.SplitRule(axis=SIDE_AXIS[split.side] if len(shape) > 1 else 0, units=split.units, unit=split.unit)
        )
    return info


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: not valid JSON ({e})") from None
