"""Loading a shard checkpoint (models/shards.py) as if it were the whole one.

A shard holds, of each tensor a strategy cuts, only this rank's part. Each
such tensor is rebuilt lazily at its full shape, zeros around the stored
part, so that the strategy (untouched, the same code as for a whole
checkpoint) cuts exactly the stored part; the zeros are never kept: the
cut is materialized one tensor at a time, as from a whole checkpoint, and
the transient peak is the same (one source tensor at a time). Tensors of
layers this rank never runs (pipeline) are never-evaluated zeros, there
only so that the model class loads.

After the cut, every part-stored tensor is compared with the stored part:
a strategy that cut differently from what the shard was fetched for fails
the rank here, instead of computing with zeros."""

from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.utils import _get_classes
from mlx_lm.utils import load_model as mlx_lm_load_model

from exod.models import shares
from exod.models.shards import MANIFEST, SHARD_FILE, read_manifest

DTYPES = {"F32": mx.float32, "F16": mx.float16, "BF16": mx.bfloat16, "U32": mx.uint32, "I32": mx.int32,
          "U16": mx.uint16, "I16": mx.int16, "U8": mx.uint8, "I8": mx.int8, "U64": mx.uint64, "I64": mx.int64,
          "BOOL": mx.bool_}


class ShardError(Exception):
    pass


def is_shard(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def _padded(stored: mx.array, entry: dict) -> mx.array:
    axis = int(entry["axis"])
    lo, hi, of = (int(g) for g in entry["grains"])
    full = list(entry["shape"])
    try:
        a, b = shares.cut(full[axis], lo, hi, of)
    except shares.ShareError:
        a, b = -1, -1
    if [*stored.shape[:axis], full[axis], *stored.shape[axis + 1:]] != full or stored.shape[axis] != b - a:
        raise ShardError(f"shard part of shape {list(stored.shape)} is not grains {lo}-{hi} of {of} of {full}")
    pieces = []
    for width in (a, full[axis] - b):
        shape = list(stored.shape)
        shape[axis] = width
        pieces.append(mx.zeros(shape, dtype=stored.dtype) if width else None)
    return mx.concatenate([p for p in (pieces[0], stored, pieces[1]) if p is not None], axis=axis)


def _weights(path: Path, manifest: dict) -> dict:
    stored = mx.load(str(path / SHARD_FILE))
    weights = {}
    for name, array in stored.items():
        entry = manifest["tensors"].get(name)
        weights[name] = _padded(array, entry) if entry else array
    for name, entry in manifest.get("absent", {}).items():
        weights[name] = mx.zeros(entry["shape"], dtype=DTYPES[entry["dtype"]])
    return weights


def load_model(path: Path, lazy: bool = True):
    """(model, config), lazily, from a whole checkpoint or a shard."""
    path = Path(path)
    manifest = read_manifest(path) if is_shard(path) else None
    if manifest is None:
        return mlx_lm_load_model(path, lazy=lazy)
    weights = _weights(path, manifest)
    shapes: dict = {}

    # mlx-lm reads model*.safetensors itself; a shard has none. Its
    # get_model_classes hook lets the model's own sanitize step receive the
    # rebuilt weights instead, so that quantization and loading stay
    # mlx-lm's. strict=False only because there is no model*.safetensors;
    # the names and shapes are checked below as strictly as mlx-lm would.
    def classes(config):
        model_class, args_class = _get_classes(config)

        class FromShard(model_class):
            def sanitize(self, _empty):
                # Handed over, not kept: the class lives as long as the model,
                # and a reference here would keep every full-size tensor alive.
                given = dict(weights)
                weights.clear()
                own = getattr(super(), "sanitize", None)
                result = own(given) if own else given
                shapes.update((k, tuple(v.shape)) for k, v in result.items())
                return result

        FromShard.__name__ = model_class.__name__
        return FromShard, args_class

    model, config = mlx_lm_load_model(path, lazy=True, strict=False, get_model_classes=classes)
    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    loaded = shapes
    missing = sorted(set(expected) - set(loaded))
    if missing:
        raise ShardError(f"the shard lacks {len(missing)} tensors the model needs, e.g. {missing[0]}")
    wrong = sorted(k for k in expected if tuple(expected[k]) != tuple(loaded[k]))
    if wrong:
        raise ShardError(f"shard tensor {wrong[0]} has shape {list(loaded[wrong[0]])}, "
                         f"the model expects {list(expected[wrong[0]])}")
    if not lazy:
        mx.eval(model.parameters())
    return model, config


def _find(name: str, keys: set) -> "str | None":
    """The parameter a checkpoint tensor became: the same path, or, where a
    strategy wrapped a module (moe_tensor wraps each MoE block), the one
    path that contains its parts in order with the same leaf."""
    if name in keys:
        return name
    want = name.split(".")
    found = []
    for key in keys:
        parts = key.split(".")
        if parts[-2:] != want[-2:] or parts[0] != want[0]:
            continue
        it = iter(parts)
        if all(p in it for p in want):
            found.append(key)
    return found[0] if len(found) == 1 else None


def check_layout(path: Path, spec) -> None:
    """A shard fetched for one expert layout (or for none) holds other
    experts than another layout needs: it fails the rank before the cut."""
    path = Path(path)
    manifest = read_manifest(path) if is_shard(path) else None
    if manifest is None:
        return
    from exod.models import expert_layout

    held = manifest.get("expert_layout")
    wanted = spec.expert_layout if spec.HasField("expert_layout") else None
    if wanted is not None:
        wanted = {str(layer): sets for layer, sets in sorted(expert_layout.as_lists(wanted).items())}
    if held != wanted:
        raise ShardError(f"the shard was cut for {_describe(held)}, the spec asks for {_describe(wanted)}")


def _describe(lists) -> str:
    if lists is None:
        return "contiguous experts (no expert layout)"
    first = sorted(lists, key=int)[0]
    return f"the expert layout with layer {first}'s ranks holding {lists[first]}"


def check_cut(model, path: Path) -> int:
    """After the strategy's cut: each part-stored tensor must be exactly the
    stored part. Returns how many were compared (0 for a whole checkpoint)."""
    path = Path(path)
    manifest = read_manifest(path) if is_shard(path) else None
    if manifest is None or not manifest["tensors"]:
        return 0
    params = dict(tree_flatten(model.parameters()))
    keys = set(params)
    stored = mx.load(str(path / SHARD_FILE))  # lazy: one tensor read at a time below
    compared = 0
    for name, entry in sorted(manifest["tensors"].items()):
        key = _find(name, keys)
        if key is None:
            continue  # a layer this rank does not run
        mine, part = params[key], stored.pop(name)
        if "experts" in entry:
            # An expert layout: the part runs from the rank's first expert to
            # its last, of which the strategy kept only those listed.
            lo = int(entry["grains"][0])
            part = part[mx.array([int(e) - lo for e in entry["experts"]])]
        if tuple(mine.shape) != tuple(part.shape) or not mx.array_equal(mine, part).item():
            raise ShardError(
                f"the strategy's cut of {name} is not the part the shard holds "
                f"(grains {entry['grains'][0]}-{entry['grains'][1]} of {entry['grains'][2]} along axis {entry['axis']}: shape "
                f"{list(part.shape)}; the strategy kept {list(mine.shape)})")
        compared += 1
        del part
    return compared
