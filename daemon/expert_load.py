"""How often the router chose each expert, per model, as the runners
measured it: kept in the data dir so that the next moe_experts placement of
a model starts from it (placement/experts.py), and so that `exod rebalance`
has it.

The runners report cumulative counts since they started (RunnerStatus.
expert_counts, on rank 0's status). A model's load is the sum over its
last MAX_INSTANCES instances, each at the latest count it reported, so a
long-lived instance does not count twice and an old one ages out. The file
is named by a digest of the model id, never by the id itself, and what is
read back is checked as if it came from the network: it is bounded and
malformed files are ignored, with a log line.
"""

import hashlib
import json
import time
from pathlib import Path

import structlog

from exod.proto import exod_pb2 as pb

log = structlog.get_logger()

MAX_INSTANCES = 8
MAX_LAYERS = 512
MAX_EXPERTS = 4096
SAVE_EVERY_S = 10.0  # writes are batched: counts change with every token


class ExpertLoad:
    def __init__(self, directory: Path):
        self.directory = directory
        self._models: dict[str, dict] = {}  # model id -> {instance id: {layer: counts}}
        self._dirty: set[str] = set()
        self._saved_at = 0.0

    def _path(self, model_id: str) -> Path:
        return self.directory / (hashlib.sha256(model_id.encode()).hexdigest()[:32] + ".json")

    def _load(self, model_id: str) -> dict:
        if model_id in self._models:
            return self._models[model_id]
        found: dict = {}
        path = self._path(model_id)
        try:
            raw = json.loads(path.read_text()) if path.exists() else {}
            if raw and raw.get("model") == model_id:
                found = {str(i): {int(layer): [int(c) for c in counts] for layer, counts in by_layer.items()}
                         for i, by_layer in list(raw.get("instances", {}).items())[-MAX_INSTANCES:]}
                for by_layer in found.values():
                    _check(by_layer)
        except (OSError, ValueError, TypeError, AttributeError) as e:
            log.warning("expert load file ignored", path=str(path), reason=str(e))
            found = {}
        self._models[model_id] = found
        return found

    def observe(self, model_id: str, instance_id: str, counts: pb.ExpertCounts) -> bool:
        """An instance's latest cumulative counts; False when they are
        malformed or out of bounds (they are then ignored)."""
        by_layer = {c.layer: list(c.counts) for c in counts.layers}
        try:
            _check(by_layer)
        except ValueError as e:
            log.warning("expert counts ignored", instance=instance_id, reason=str(e))
            return False
        if not any(sum(v) for v in by_layer.values()):
            return False
        instances = self._load(model_id)
        if instances.get(instance_id) == by_layer:
            return True
        instances.pop(instance_id, None)
        instances[instance_id] = by_layer
        while len(instances) > MAX_INSTANCES:
            instances.pop(next(iter(instances)))
        self._dirty.add(model_id)
        return True

    def counts(self, model_id: str) -> "pb.ExpertCounts | None":
        """The model's summed counts, or None when none were measured."""
        instances = self._load(model_id)
        total: dict[int, list[int]] = {}
        for by_layer in instances.values():
            for layer, counts in by_layer.items():
                have = total.setdefault(layer, [0] * len(counts))
                if len(have) == len(counts):
                    total[layer] = [a + b for a, b in zip(have, counts)]
        if not total:
            return None
        return pb.ExpertCounts(layers=[pb.LayerCounts(layer=layer, counts=total[layer]) for layer in sorted(total)])

    def due(self) -> bool:
        return bool(self._dirty) and time.monotonic() - self._saved_at >= SAVE_EVERY_S

    def snapshot(self) -> list[tuple[Path, str]]:
        """(path, text) of every model changed since the last save; the
        writing happens off the event loop (save)."""
        out = []
        for model_id in sorted(self._dirty):
            body = {"model": model_id, "instances": {i: {str(layer): counts for layer, counts in by_layer.items()}
                                                      for i, by_layer in self._models.get(model_id, {}).items()}}
            out.append((self._path(model_id), json.dumps(body)))
        self._dirty.clear()
        self._saved_at = time.monotonic()
        return out


def save(files: list[tuple[Path, str]]) -> None:
    for path, text in files:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(text)
        temporary.replace(path)


def _check(by_layer: dict) -> None:
    if len(by_layer) > MAX_LAYERS:
        raise ValueError(f"counts for {len(by_layer)} layers, more than {MAX_LAYERS}")
    for layer, counts in by_layer.items():
        if not 0 <= int(layer) < 10**6 or len(counts) > MAX_EXPERTS or any(c < 0 for c in counts):
            raise ValueError(f"layer {layer}: {len(counts)} counts out of bounds")
