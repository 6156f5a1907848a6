"""What one rank needs of a checkpoint, and the shard checkpoint that holds
exactly that. Pure planning plus the file format; no MLX.

A rank needs
- pipeline: the tensors of its layers and every tensor outside the layers
  (embedding, final norm, lm_head: every stage computes the logits);
- tensor and moe_tensor: every tensor, but of each tensor the strategy cuts
  only its own part, rank r taking the grains its share names along the cut
  (models/shares.py; the r-th equal part when the shares are even)
  axis, exactly as mlx.nn.layers.distributed.shard_inplace cuts it
  ("all-to-sharded": axis -2 of weight, scales and biases, -1 of a 1-D
  bias; "sharded-to-all": axis -1, a bias not cut); and one layer whole,
  the one the canary computes uncut from the checkpoint.
- hybrid: of its stage's layers (pipeline_range over the stages), the
  part its share within the stage names of what the stage's strategy
  (moe_tensor, tensor) cuts, one of those layers
  whole for the canary, and every tensor outside the layers, whole;
- any other strategy: everything.

A part of a tensor along an axis is `count` blocks of `length` bytes, one
every `stride` bytes of the source file: what a peer serves (ByteRange).
The shard checkpoint is a safetensors file with the parts as stored, a
manifest (also in the file's metadata) that names the model, revision,
strategy, rank, world size, the source files' digests and, per tensor, its
full shape, axis and part, so that the runner rebuilds every tensor at its
full shape and the strategy's own cut selects exactly the stored part."""

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from . import expert_layout as layout
from . import shares
from .errors import ModelError
from .safetensors_header import Entry

SHARD_FILE = "shard.safetensors"
MANIFEST = "exod-shard.json"
FORMAT = 2  # 2: parts named by grains (uneven shares)
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
               "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
# Small files a runner needs besides the weights (config, tokenizer, chat template).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx", ".npz")
MAX_SIDE_FILE = 64 * 1024 * 1024
SLICING_STRATEGIES = ("tensor", "moe_tensor", "moe_experts")


@dataclass(frozen=True)
class Part:
    """One stored tensor of the shard and where its bytes lie in the source."""

    tensor: str
    file: str              # the source file, in the checkpoint
    code: str              # safetensors dtype code
    full_shape: tuple
    shape: tuple           # as stored in the shard
    axis: Optional[int]    # absolute axis cut; None: the whole tensor
    grains: tuple          # (lo, hi, of): grains [lo, hi) of `of` along axis; whole: (0, 1, 1)
    offset: int            # source byte ranges: `count` blocks of `length`, `stride` apart
    length: int
    stride: int
    count: int

    @property
    def nbytes(self) -> int:
        return self.length * self.count


@dataclass
class RankNeeds:
    """Everything one rank needs: tensor parts, absent tensors (pipeline:
    other stages' layers, rebuilt as never-evaluated zeros so the model
    loads), and whole side files."""

    parts: list
    absent: dict = field(default_factory=dict)   # name -> (code, shape)
    side_files: list = field(default_factory=list)  # names of config/tokenizer files
    layer_range: tuple = (0, 0)
    canary_layer: int = -1
    grains: tuple = ()  # tensor strategies: (lo, hi, of), the grains this rank holds
    # moe_experts with a layout: the whole layout ({layer: per-rank experts},
    # layers as strings, as JSON keeps them), and the experts this rank keeps
    # of each routed tensor (the part stored runs from the first to the last)
    expert_layout: Optional[dict] = None
    experts: dict = field(default_factory=dict)

    @property
    def tensor_bytes(self) -> int:
        return sum(p.nbytes for p in self.parts)


def slice_of(entry: Entry, axis: int, lo: int, hi: int, of: int) -> tuple:
    """(offset, length, stride, count, shape) of grains [lo, hi) of `of`
    along `axis` of a C-order tensor."""
    shape = tuple(entry.shape)
    element = DTYPE_BYTES[entry.code]
    try:
        a, b = shares.cut(shape[axis], lo, hi, of)
    except shares.ShareError:
        raise ModelError(f"{entry.name}: axis {axis} of {list(shape)} does not divide into {of} grains") from None
    inner = math.prod(shape[axis + 1:]) * element
    outer = math.prod(shape[:axis])
    stored = shape[:axis] + (b - a,) + shape[axis + 1:]
    return entry.start + a * inner, (b - a) * inner, shape[axis] * inner, outer, stored


def whole(entry: Entry, file: str) -> Part:
    return Part(entry.name, file, entry.code, tuple(entry.shape), tuple(entry.shape), None, (0, 1, 1),
                entry.start, entry.nbytes, entry.nbytes, 1)


def cut_part(name: str, file: str, entry: Entry, axis: int, lo: int, hi: int, of: int) -> Part:
    """Grains [lo, hi) of `of` of a tensor along `axis`, as stored."""
    offset, length, stride, count, stored = slice_of(entry, axis, lo, hi, of)
    return Part(name, file, entry.code, tuple(entry.shape), stored, axis, (lo, hi, of), offset, length, stride, count)


def canary_layer(spec, config: dict, arch, within: tuple = ()) -> int:
    """The layer the runner's canary computes uncut from the checkpoint
    where every layer is held (runner/canary.py choose_layer): the first
    probeable layer, preferring one with experts; within: the held range."""
    layers = list(range(*within)) if within else list(range(spec.num_layers))
    allowed = set(arch.canary_layers(config))
    probeable = [i for i in layers if i in allowed] or layers
    experts = {t.layer for t in spec.tensors if t.HasField("moe_tensor_split")}
    return next((i for i in probeable if i in experts), probeable[0] if probeable else -1)


def pipeline_range(layers: int, split: list, rank: int, world: int) -> tuple:
    """mlx-lm's pipeline(): rank r runs the layers after those of ranks
    r+1 .. N-1 (rank 0 the last ones); an even split when none is given."""
    if not split:
        base, extra = divmod(layers, world)
        split = [base + (1 if r < extra else 0) for r in range(world)]
    if len(split) != world or sum(split) != layers:
        raise ModelError(f"pipeline split {list(split)} does not cover {layers} layers on {world} ranks")
    start = sum(split[rank + 1:])
    return start, start + split[rank]


def is_side_file(name: str, size: int) -> bool:
    return "/" not in name and not name.endswith(WEIGHT_SUFFIXES) and size <= MAX_SIDE_FILE \
        and name != "model.safetensors.index.json"


def strategy_grains(spec, strategy: str) -> int:
    """The grains of a tensor strategy over this spec's cut tensors."""
    field_name = f"{strategy}_split"
    return shares.grains_of(getattr(t, field_name).units for t in spec.tensors
                            if getattr(t, field_name).units)


def rank_needs(tensors: dict, spec, config: dict, arch, strategy: str, rank: int, world: int,
               pipeline_layers: list, files: dict, rank_shares=(), expert_layout=None,
               stage_ranks=(), stage_strategy: str = "moe_tensor") -> RankNeeds:
    """tensors: name -> (file, Entry) over the checkpoint; spec: its
    ModelSpec (split rules, layers); files: name -> size of every file;
    rank_shares: each rank's grains (tensor strategies; empty: even);
    expert_layout: moe_experts' layout (models/expert_layout.py; None:
    contiguous experts by share); stage_ranks, stage_strategy: a hybrid's
    ranks per stage (pipeline_layers then per stage) and their cut."""
    info = {t.name: t for t in spec.tensors}
    side = sorted(n for n, size in files.items() if is_side_file(n, size))
    parts, absent = [], {}
    if world <= 1:
        strategy = "whole"
    if strategy == "pipeline":
        start, end = pipeline_range(spec.num_layers, list(pipeline_layers), rank, world)
        for name, (file, entry) in sorted(tensors.items()):
            layer = info[name].layer if name in info else -1
            if layer < 0 or start <= layer < end:
                parts.append(whole(entry, file))
            else:
                absent[name] = (entry.code, tuple(entry.shape))
        return RankNeeds(parts, absent, side, (start, end))
    if strategy == "hybrid":
        return _stage_needs(tensors, spec, config, arch, info, side, rank, list(stage_ranks), list(pipeline_layers),
                            list(rank_shares), stage_strategy or "moe_tensor")
    if strategy not in SLICING_STRATEGIES:
        return RankNeeds([whole(e, f) for _, (f, e) in sorted(tensors.items())], {}, side, (0, spec.num_layers))
    keep = canary_layer(spec, config, arch)
    if strategy == "moe_experts" and expert_layout is not None:
        return _layout_needs(tensors, spec, info, side, keep, rank, world, expert_layout, rank_shares)
    grains = strategy_grains(spec, strategy)
    try:
        held = shares.check(list(rank_shares) or shares.even(grains, world), grains, world)
    except shares.ShareError as e:
        raise ModelError(f"{strategy}: {e}") from None
    lo, hi = shares.bounds(held, rank)
    for name, (file, entry) in sorted(tensors.items()):
        t = info.get(name)
        rule = getattr(t, f"{strategy}_split") if t is not None else None
        if t is None or not rule.units or t.layer == keep or not entry.shape:
            parts.append(whole(entry, file))
            continue
        parts.append(cut_part(name, file, entry, rule.axis % len(entry.shape), lo, hi, grains))
    return RankNeeds(parts, {}, side, (0, spec.num_layers), keep, (lo, hi, grains))


def _stage_needs(tensors: dict, spec, config: dict, arch, info: dict, side: list, rank: int, stages: list,
                 split: list, rank_shares: list, inner: str) -> RankNeeds:
    """A hybrid rank: its stage's layers, cut as `inner` cuts them over
    the stage's ranks (runner/strategies.py hybrid)."""
    if inner not in ("moe_tensor", "tensor"):
        raise ModelError(f"hybrid: {inner} inside a stage is not supported")
    if not stages or min(stages) < 1 or not 0 <= rank < sum(stages):
        raise ModelError(f"hybrid: stages {stages} do not hold rank {rank}")
    stage = next(i for i in range(len(stages)) if rank < sum(stages[:i + 1]))
    first = sum(stages[:stage])
    start, end = pipeline_range(spec.num_layers, split, stage, len(stages))
    count = stages[stage]
    grains = strategy_grains(spec, inner)
    mine = rank_shares[first:first + count] if rank_shares else []
    if rank_shares and len(rank_shares) != sum(stages):
        raise ModelError(f"hybrid: {len(rank_shares)} shares for {sum(stages)} ranks")
    try:
        held = shares.check(mine or shares.even(grains, count), grains, count)
    except shares.ShareError as e:
        raise ModelError(f"hybrid: stage {stage}: {e}") from None
    lo, hi = shares.bounds(held, rank - first)
    keep = canary_layer(spec, config, arch, (start, end)) if count > 1 else -1
    parts, absent = [], {}
    for name, (file, entry) in sorted(tensors.items()):
        t = info.get(name)
        layer = t.layer if t is not None else -1
        if layer >= 0 and not start <= layer < end:
            absent[name] = (entry.code, tuple(entry.shape))
            continue
        rule = getattr(t, f"{inner}_split") if t is not None else None
        if count == 1 or t is None or not rule.units or layer == keep or not entry.shape:
            parts.append(whole(entry, file))
            continue
        parts.append(cut_part(name, file, entry, rule.axis % len(entry.shape), lo, hi, grains))
    return RankNeeds(parts, absent, side, (start, end), keep, (lo, hi, grains) if count > 1 else ())


def _layout_needs(tensors: dict, spec, info: dict, side: list, keep: int, rank: int, world: int,
                  expert_layout, rank_shares) -> RankNeeds:
    """moe_experts with an expert layout: of each routed-experts tensor
    (unit "experts"), the range of experts from this rank's first to its
    last in that layer (one contiguous part, which a peer serves as one
    byte range; the experts between that the rank does not hold are read
    too, and dropped by the runner's gather); of a shared expert, the most
    even split of its own grains, as the runner cuts it."""
    routed = [t for t in spec.tensors if t.moe_experts_split.unit == "experts" and t.moe_experts_split.units]
    if not routed:
        raise ModelError("moe_experts: an expert layout for a model without routed experts")
    count = int(routed[0].moe_experts_split.units)
    try:
        sets = layout.validate(expert_layout, count, sorted({t.layer for t in routed}), world, list(rank_shares))
    except layout.LayoutError as e:
        raise ModelError(f"moe_experts: expert layout: {e}") from None
    shared = shares.grains_of(t.moe_experts_split.units for t in spec.tensors
                              if t.moe_experts_split.units and t.moe_experts_split.unit != "experts")
    if shared and shared < world:
        raise ModelError(f"moe_experts: the shared expert has {shared} grain(s), fewer than {world} ranks")
    shared_lo, shared_hi = shares.bounds(shares.even(shared, world), rank) if shared else (0, 1)
    parts, experts = [], {}
    for name, (file, entry) in sorted(tensors.items()):
        t = info.get(name)
        rule = t.moe_experts_split if t is not None else None
        if t is None or not rule.units or t.layer == keep or not entry.shape:
            parts.append(whole(entry, file))
            continue
        axis = rule.axis % len(entry.shape)
        if rule.unit == "experts":
            held = sets[t.layer][rank]
            lo, hi, of = held[0], held[-1] + 1, count
            experts[name] = held
        else:
            lo, hi, of = shared_lo, shared_hi, shared
        parts.append(cut_part(name, file, entry, axis, lo, hi, of))
    return RankNeeds(parts, {}, side, (0, spec.num_layers), keep, (shared_lo, shared_hi, shared),
                     expert_layout={str(k): v for k, v in sorted(sets.items())}, experts=experts)


def shard_key(model_id: str, revision: str, strategy: str, rank: int, world: int, needs: RankNeeds,
              digests: dict) -> str:
    """Names the shard by everything that decides its bytes, and by the
    expert layout, which also decides which of them the runner keeps and
    which slots it computes: placed again the same way, the same key finds
    it; placed with another layout, it is another shard."""
    h = hashlib.sha256(json.dumps([model_id, revision, strategy, rank, world, needs.side_files,
                                   [(p.tensor, p.file, p.offset, p.length, p.stride, p.count) for p in needs.parts],
                                   sorted(needs.absent), sorted(digests.items()),
                                   *([needs.expert_layout] if needs.expert_layout is not None else [])]).encode()
                       ).hexdigest()
    return f"{strategy}-{rank}of{world}-{h[:16]}"


# ------------------------------------------------------------------ the file


def manifest(model_id: str, revision: str, strategy: str, rank: int, world: int, needs: RankNeeds,
             digests: dict, key: str) -> dict:
    return {
        "format": FORMAT, "model_id": model_id, "revision": revision, "strategy": strategy, "rank": rank,
        "world_size": world, "key": key, "layer_start": needs.layer_range[0], "layer_end": needs.layer_range[1],
        "canary_layer": needs.canary_layer, "grains": list(needs.grains), "source_digests": digests,
        "tensors": {p.tensor: {"shape": list(p.full_shape), "axis": p.axis, "grains": list(p.grains),
                               **({"experts": needs.experts[p.tensor]} if p.tensor in needs.experts else {})}
                    for p in needs.parts if p.axis is not None},
        "expert_layout": needs.expert_layout,
        "absent": {name: {"dtype": code, "shape": list(shape)} for name, (code, shape) in needs.absent.items()},
    }


def header(parts: list, meta: dict) -> tuple[bytes, list[int]]:
    """The safetensors header for the parts in order, and each part's
    absolute offset in the file. Data are contiguous, as safetensors wants."""
    entries, position = {}, 0
    for p in parts:
        entries[p.tensor] = {"dtype": p.code, "shape": list(p.shape), "data_offsets": [position, position + p.nbytes]}
        position += p.nbytes
    entries["__metadata__"] = {"format": "mlx", "exod_shard": json.dumps(meta, separators=(",", ":"))}
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    base = 8 + len(raw)
    offsets, position = [], base
    for p in parts:
        offsets.append(position)
        position += p.nbytes
    return len(raw).to_bytes(8, "little") + raw, offsets


def read_manifest(directory: Path) -> Optional[dict]:
    try:
        data = json.loads((Path(directory) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == FORMAT else None


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_part(name: str, size: int) -> Part:
    """A whole small file (config, tokenizer) as a part to fetch."""
    return Part(name, name, "U8", (size,), (size,), None, (0, 1, 1), 0, size, size, 1)


class ShardWriter:
    """A shard being written: a private temporary folder beside its final
    place, the tensor file preallocated (a disk too small fails at once),
    parts written where the header puts them, side files (config,
    tokenizer) beside it, then fsync and one atomic rename. Until the rename
    nothing is at the final path, and the folder has no manifest, so
    nothing half-written can ever be loaded; abort() removes it all.

    Parts are numbered: the tensor parts first, then the side files."""

    def __init__(self, final: Path, parts: list, meta: dict, side: list = ()):
        import tempfile

        self.final = Path(final)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=self.final.parent))
        self.meta = meta
        self.parts = list(parts)
        self.side = list(side)  # (name, size)
        raw, self.offsets = header(self.parts, meta)
        self.size = len(raw) + sum(p.nbytes for p in self.parts)
        self.fds = []
        try:
            self.fd = self._open(self.tmp / SHARD_FILE, self.size)
            os.pwrite(self.fd, raw, 0)
            for name, size in self.side:
                self.fds.append(self._open(self.tmp / name, size))
        except OSError:
            self.abort()
            raise

    def _open(self, path: Path, size: int) -> int:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        if size:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, size)
            else:
                os.ftruncate(fd, size)
        return fd

    @property
    def all_parts(self) -> list:
        return self.parts + [file_part(name, size) for name, size in self.side]

    @property
    def bytes(self) -> int:
        return self.size + sum(size for _, size in self.side)

    def write(self, index: int, position: int, data) -> None:
        """Bytes of part `index` at `position` within the part."""
        if index >= len(self.parts):
            name, size = self.side[index - len(self.parts)]
            if position + len(data) > size:
                raise ValueError(f"{name}: {position}+{len(data)} beyond its {size} bytes")
            os.pwrite(self.fds[index - len(self.parts)], data, position)
            return
        if position + len(data) > self.parts[index].nbytes:
            raise ValueError(f"{self.parts[index].tensor}: {position}+{len(data)} beyond the part")
        os.pwrite(self.fd, data, self.offsets[index] + position)

    def commit(self) -> Path:
        import shutil

        for fd in [self.fd, *self.fds]:
            os.fsync(fd)
            os.close(fd)
        self.fd, self.fds = None, []
        (self.tmp / MANIFEST).write_text(json.dumps(self.meta))
        fsync_dir(self.tmp)
        if self.final.exists():  # the same shard, finished meanwhile by another placement
            shutil.rmtree(self.tmp, ignore_errors=True)
            return self.final
        os.rename(self.tmp, self.final)
        fsync_dir(self.final.parent)
        return self.final

    def abort(self) -> None:
        import shutil

        for fd in [self.fd, *self.fds]:
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.fd, self.fds = None, []
        shutil.rmtree(self.tmp, ignore_errors=True)


def read_part(fd: int, part: "Part | tuple", skip: int = 0, chunk: int = 1 << 20):
    """The bytes of a part (or of a (offset, length, stride, count) range)
    from an open source file, from `skip` on, in chunks of at most `chunk`:
    what a source serves and a local copy reads."""
    import numpy as np

    if isinstance(part, Part):
        offset, length, stride, count = part.offset, part.length, part.stride, part.count
    else:
        offset, length, stride, count = part
    count = max(count, 1)
    stride = stride or length
    total = length * count
    position = skip
    while position < total:
        block, within = divmod(position, length)
        if within or length >= chunk:  # a large block, piece by piece
            n = min(chunk, length - within)
            data = os.pread(fd, n, offset + block * stride + within)
        else:  # small blocks: several in one read, the gaps dropped
            k = min(count - block, max(1, chunk // length))
            span = os.pread(fd, (k - 1) * stride + length, offset + block * stride)
            n = k * length
            if stride == length:
                data = span
            else:
                raw = np.frombuffer(span, dtype=np.uint8)
                if raw.size != (k - 1) * stride + length:
                    data = b""
                else:
                    data = np.lib.stride_tricks.as_strided(raw, shape=(k, length), strides=(stride, 1)).tobytes()
        if len(data) != n:
            raise OSError(f"short read: {len(data)} of {n} bytes at {offset + block * stride + within}")
        yield position, data
        position += n


@dataclass
class RankPlan:
    """One rank's shard: what it needs, its key and manifest."""

    needs: RankNeeds
    key: str
    meta: dict
    strategy: str
    rank: int
    world: int

    @property
    def side_files(self) -> list:
        return self.needs.side_files


def plan_rank(checkpoint, strategy: str, rank: int, world: int, pipeline_layers=(), spec=None,
              rank_shares=(), expert_layout=None, stage_ranks=(), stage_strategy: str = "moe_tensor") -> RankPlan:
    """What rank `rank` of `world` under `strategy` needs of `checkpoint`
    (models/checkpoint.Checkpoint); `spec`: its ModelSpec, when at hand;
    rank_shares: every rank's grains (tensor strategies; empty: even);
    expert_layout: moe_experts' (a pb.ExpertLayout or its dict; None: none);
    stage_ranks, stage_strategy: a hybrid's ranks per stage and their cut."""
    from .architectures import for_model_type

    spec = spec if spec is not None else checkpoint.spec(checkpoint.model_id)
    config = checkpoint.config
    arch = for_model_type(config["model_type"])
    sizes = {name: size for name, (size, _) in checkpoint.files.items()}
    needs = rank_needs(checkpoint.tensors(), spec, config, arch, strategy, rank, world, list(pipeline_layers), sizes,
                       list(rank_shares), expert_layout, list(stage_ranks), stage_strategy)
    digests = {f: checkpoint.files[f][1] for f in sorted({p.file for p in needs.parts} | set(needs.side_files))
               if checkpoint.files.get(f, (0, ""))[1]}
    key = shard_key(checkpoint.model_id, checkpoint.revision, strategy, rank, world, needs, digests)
    meta = manifest(checkpoint.model_id, checkpoint.revision, strategy, rank, world, needs, digests, key)
    return RankPlan(needs, key, meta, strategy, rank, world)


def write_local(plan: RankPlan, root: Path, final: Path, sizes: dict) -> Path:
    """The shard from files that are on this node (a partial checkpoint, a
    test): the same writer a fetch uses, reading instead of receiving."""
    writer = ShardWriter(final, plan.needs.parts, plan.meta, [(n, sizes[n]) for n in plan.side_files])
    try:
        for index, part in enumerate(writer.all_parts):
            fd = os.open(Path(root) / part.file, os.O_RDONLY)
            try:
                for position, data in read_part(fd, part):
                    writer.write(index, position, data)
            finally:
                os.close(fd)
        return writer.commit()
    except BaseException:
        writer.abort()
        raise
