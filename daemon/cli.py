"""The `exod` command."""

import argparse
import json
import os
import sys
from pathlib import Path

from google.protobuf import json_format

from exod.models import ModelError
from exod.proto import exod_pb2 as pb

EXIT_BAD_INPUT = 2
EXIT_NO_FIT = 1


class ServiceFailed(Exception):
    """The daemon answered 5xx: the request was fine, the service failed
    (an instance that stopped mid-answer, a peer that did not answer)."""


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise UsageError(message)


def to_json(message) -> dict:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


# ------------------------------------------------------------------ models / inspect


def cmd_models(args) -> int:
    from exod.models import catalog

    cards = catalog.cards()
    if args.json:
        print(json.dumps([
            {"id": c["id"], "name": c.get("display_name", c["id"]), "checkpoint": c.get("checkpoint"),
             "model_type": c["config"]["model_type"], "published_weight_bytes": c.get("published_weight_bytes")}
            for c in cards.values()
        ], indent=2))
        return 0
    print(f"{'ID':28} {'MODEL TYPE':14} {'SIZE':>9}  CHECKPOINT")
    for c in cards.values():
        size = c.get("published_weight_bytes") or 0
        print(f"{c['id']:28} {c['config']['model_type']:14} {size / 1e9:7.1f}GB  {c.get('checkpoint', '')}")
    return 0


def local_store(args=None):
    """This machine's stores, as a daemon started here would read them."""
    from exod.models.store import Store

    from .paths import data_dir

    where = Path(args.data_dir).expanduser() if getattr(args, "data_dir", None) else data_dir()
    return Store(where, getattr(args, "models_dir", None) or [])


def cmd_inspect(args) -> int:
    from exod.models.store import spec_here
    from exod.placement.profile import CLASS_LABEL, CLASSES

    spec = spec_here(args.model, local_store(args))
    params = dict.fromkeys(CLASSES, 0)
    sizes = dict.fromkeys(CLASSES, 0)
    for t in spec.tensors:
        params[t.tensor_class] += t.parameters
        sizes[t.tensor_class] += t.bytes
    if args.json:
        summary = {k: v for k, v in to_json(spec).items() if k not in ("tensors", "kv_cache")}
        summary["by_class"] = {
            CLASS_LABEL[c]: {"parameters": params[c], "bytes": sizes[c]} for c in CLASSES if sizes[c]
        }
        summary["kv_cache_bytes_per_token"] = sum(k.bytes_per_token for k in spec.kv_cache if not k.window_tokens)
        if args.tensors:
            summary["tensors"] = [to_json(t) for t in spec.tensors]
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{spec.model_id}  ({spec.model_type}, {spec.dtype}, from {spec.source})")
    print(f"layers {spec.num_layers}  hidden {spec.hidden_size}  vocab {spec.vocab_size}  max context {spec.max_context}")
    if spec.num_experts:
        print(f"experts {spec.num_experts}, {spec.experts_per_token} per token")
    print(f"\n{'CLASS':16} {'PARAMETERS':>16} {'BYTES':>12}")
    for c in CLASSES:
        if sizes[c]:
            print(f"{CLASS_LABEL[c]:16} {params[c]:16,} {sizes[c] / 1e9:10.2f}GB")
    print(f"{'total':16} {spec.total_parameters:16,} {spec.total_bytes / 1e9:10.2f}GB")
    if spec.num_experts:
        print(f"{'active / token':16} {spec.active_parameters_per_token:16,}")
    full = sum(k.bytes_per_token for k in spec.kv_cache if not k.window_tokens)
    windowed = sum(k.bytes_per_token * k.window_tokens for k in spec.kv_cache if k.window_tokens)
    print(f"\nKV cache: {full / 1024:.1f} KiB per context token + {windowed / 1e6:.1f} MB of windows, per sequence")
    print(f"runs on one node; on more: {', '.join(spec.proven_strategies) or 'nothing'}")
    for strategy, why in sorted(spec.refused_strategies.items()):
        print(f"not {strategy}: {why}")
    for note in spec.notes:
        print(f"note: {note}")
    if args.tensors:
        for t in spec.tensors:
            q = f" {t.quantization.mode}{t.quantization.bits}/{t.quantization.group_size}" if t.quantization.bits else ""
            print(f"{t.name:64} {str(list(t.shape)):24} {t.dtype:9}{q:14} {t.bytes:>14,} {CLASS_LABEL.get(t.tensor_class, '?')}")
    return 0


# ------------------------------------------------------------------ plan


def cmd_plan(args) -> int:
    from exod.models.store import described_here
    from exod.placement import STRATEGY_BY_NAME, parse_cluster, plan, synthetic
    from exod.placement.units import parse_bytes

    if args.cluster and args.nodes is not None:
        raise UsageError("give either --cluster or --nodes, not both")
    if args.cluster:
        try:
            text = Path(args.cluster).read_text()
        except OSError as e:
            raise UsageError(f"cannot read {args.cluster}: {e.strerror}") from None
        cluster = parse_cluster(text)
    else:
        memory = parse_bytes(args.memory)
        bandwidth = parse_bytes(args.bandwidth) if args.bandwidth else None
        cluster = synthetic(args.nodes if args.nodes is not None else 2, memory,
                            *([bandwidth] if bandwidth else []))
    for value, flag in ((args.context, "--context"), (args.concurrency, "--concurrency")):
        if value is not None and value <= 0:
            raise UsageError(f"{flag} must be positive, got {value}")
    request = pb.PlacementRequest(
        model=args.model, context_length=args.context or 0, concurrency=args.concurrency or 0,
        strategy=STRATEGY_BY_NAME[args.strategy] if args.strategy else 0,
        backend={"ring": pb.RING, "jaccl": pb.JACCL}[args.backend] if args.backend else 0,
        nodes=args.only or [],
    )
    if args.headroom is not None:
        request.headroom_fraction = args.headroom
    counts = None
    if args.routing:
        from google.protobuf import json_format

        try:
            counts = json_format.Parse(Path(args.routing).read_text(), pb.ExpertCounts())
        except OSError as e:
            raise UsageError(f"cannot read {args.routing}: {e.strerror}") from None
        except json_format.ParseError as e:
            raise UsageError(f"{args.routing}: not routing counts ({str(e).splitlines()[0]}); expected "
                             '{"layers": [{"layer": 0, "counts": [...]}, ...]}, as a runner\'s expert_counts') from None
    spec, checkpoint = described_here(args.model, local_store(args))
    result = plan(spec, cluster, request, expert_counts=counts)
    if checkpoint is not None and any(n.models for n in cluster.nodes):
        from .models import annotate  # what each rank would fetch, from the holdings the cluster file lists

        result = annotate(result, checkpoint, cluster)
    if args.json:
        print(json.dumps(to_json(result), indent=2))
    else:
        print_plan(spec, result)
    return 0 if result.HasField("chosen") else EXIT_NO_FIT


def print_plan(spec: pb.ModelSpec, result: pb.Plan) -> None:
    from exod.placement import BACKEND_NAMES, STRATEGY_NAMES
    from exod.placement.spec import stages_text

    def describe(c: pb.Placement) -> str:
        return f"{STRATEGY_NAMES[c.strategy]} over {len(c.ranks)} node(s), {BACKEND_NAMES[c.backend]}"

    def stages(c: pb.Placement) -> str:
        return f"  {stages_text(c)}" if c.strategy == pb.HYBRID and c.stage_ranks and not c.rejected else ""

    first = result.candidates[0] if result.candidates else None
    if first:
        print(f"{spec.model_id}: {spec.total_bytes / 1e9:.1f} GB of weights, context {first.context_length}, "
              f"concurrency {first.concurrency}")
    print(f"\n{'STRATEGY':11} {'BACKEND':7} {'NODES':>5} {'TOK/S':>8} {'MAX RANK':>10}  FITS")
    for c in result.candidates:
        peak = max((r.memory.total_bytes for r in c.ranks), default=0)
        # A candidate refused for a reason other than memory has no estimates to show.
        numbers = f"{'-':>8} {'-':>10}" if c.rejected else f"{c.predicted_decode_tokens_per_s:8.1f} {peak / 1e9:8.1f}GB"
        print(f"{STRATEGY_NAMES[c.strategy]:11} {BACKEND_NAMES[c.backend]:7} {len(c.ranks):5} "
              f"{numbers}  {'yes' if c.fits else 'no: ' + (c.reasons[0] if c.reasons else '')}{stages(c)}")
    if not result.HasField("chosen"):
        print(f"\n{result.reasons[0] if result.reasons else 'nothing fits'}")
        return
    chosen = result.chosen
    print(f"\nchosen: {describe(chosen)}, {chosen.predicted_decode_tokens_per_s:.1f} tok/s predicted "
          f"(compute {chosen.predicted_compute_s * 1e3:.2f} ms + communication "
          f"{chosen.predicted_communication_s * 1e3:.2f} ms per token)")
    if stages(chosen):
        print(stages(chosen).strip())
    print(f"{'RANK':>4} {'NODE':16} {'LAYERS':>9} {'SHARE':>9} {'WEIGHTS':>9} {'EXPERTS':>9} {'ATTN':>8} {'KV':>8} "
          f"{'OVERHEAD':>9} {'TOTAL':>9} {'USABLE':>9}  TRANSFER")
    for r in chosen.ranks:
        m = r.memory
        # A cutting strategy's share: grains of every cut tensor (models/shares.py).
        share = f"{r.share}/{r.share_of}" if r.share_of else "-"
        print(f"{r.rank:4} {r.node_name:16} {f'{r.layer_start}-{r.layer_end}':>9} {share:>9} {m.weights_bytes / 1e9:8.1f}G "
              f"{(m.routed_experts_bytes + m.shared_experts_bytes) / 1e9:8.1f}G {m.attention_bytes / 1e9:7.1f}G "
              f"{m.kv_cache_bytes / 1e9:7.1f}G {m.overhead_bytes / 1e9:8.1f}G {m.total_bytes / 1e9:8.1f}G "
              f"{r.usable_bytes / 1e9:8.1f}G  {transfer_text(r)}")
    if chosen.HasField("expert_layout"):
        replicas = sum(r.share for r in chosen.ranks) - chosen.ranks[0].share_of
        print(f"experts placed by measured routing load in {len(chosen.expert_layout.layers)} MoE layers: "
              f"routing imbalance {chosen.predicted_routing_imbalance:.3f} (1.000 balanced)"
              + (f", {replicas} replica(s) per layer" if replicas > 0 else ""))
    if chosen.bytes_to_fetch:
        print(f"to fetch before loading: {chosen.bytes_to_fetch / 1e9:.2f} GB, about "
              f"{chosen.predicted_transfer_s:.0f} s over the measured links")
    for reason in chosen.reasons:
        print(reason)


def transfer_text(r) -> str:
    """Bytes already on the rank's node, to fetch, from where, how long."""
    t = r.transfer
    if not t.bytes_needed:
        return "-"
    if not t.bytes_to_fetch:
        return f"{t.bytes_local / 1e9:.2f}G local"
    return (f"{t.bytes_local / 1e9:.2f}G local, fetch {t.bytes_to_fetch / 1e9:.2f}G from {', '.join(t.sources)} "
            f"(~{t.predicted_s:.0f} s)")


# ------------------------------------------------------------------ run (local ranks)


def parse_size(text: str) -> int:
    """A byte count as argparse takes it: 0, 512MB, 2GB..."""
    from exod.placement.units import parse_bytes

    if text.strip() == "0":
        return 0
    try:
        return parse_bytes(text)
    except (ValueError, Exception) as e:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} ({e})") from None


def cmd_run(args) -> int:
    """Every rank on this machine over loopback: plan, launch, wait for Ready,
    answer one prompt, shut down."""
    from exod.models import inventory
    from exod.placement import STRATEGY_BY_NAME, plan, synthetic
    from exod.placement.spec import layout as spec_layout
    from exod.placement.spec import stages_text as spec_stages
    from exod.runner.launch import LaunchError, LocalInstance

    if args.ranks < 1:
        raise UsageError(f"--ranks must be at least 1, got {args.ranks}")
    if args.context <= 0 or args.max_tokens <= 0:
        raise UsageError("--context and --max-tokens must be positive")
    from exod.models.store import dir_here

    model_dir = dir_here(args.model, local_store(args))
    spec = inventory.from_directory(model_dir)
    request = pb.PlacementRequest(context_length=args.context,
                                  strategy=STRATEGY_BY_NAME[args.strategy] if args.strategy else 0)
    result = plan(spec, synthetic(args.ranks, 10**15), request)
    fitting = [c for c in result.candidates if len(c.ranks) == args.ranks and c.fits]
    if not fitting:
        why = next((r for c in result.candidates if len(c.ranks) == args.ranks for r in c.reasons), "no candidate")
        raise UsageError(f"cannot run {args.model} on {args.ranks} ranks: {why}")
    chosen = max(fitting, key=lambda c: c.predicted_decode_tokens_per_s)
    fields = spec_layout(chosen)  # as the daemon writes each rank's spec
    strategy = fields.strategy
    log = sys.stderr
    stages = f" ({spec_stages(chosen)})" if fields.stage_ranks else ""
    print(f"exod: {args.model} as {strategy} over {args.ranks} local ranks{stages}", file=log)
    deadlines = pb.RunnerDeadlines(load_s=args.load_timeout)
    with LocalInstance(model_dir, strategy, args.ranks, pipeline_layers=fields.pipeline_layers,
                       context_length=args.context, deadlines=deadlines,
                       estimated_bytes=[r.memory.total_bytes for r in chosen.ranks],
                       max_batch=chosen.concurrency, prefix_cache_tokens=chosen.prefix_cache_tokens,
                       shares=fields.shares, stage_ranks=fields.stage_ranks,
                       stage_strategy=fields.stage_strategy) as instance:
        try:
            instance.wait_ready(args.load_timeout + 120)
        except LaunchError as e:
            print(f"exod: error: {e} (logs in {instance.log_dir})", file=log)
            return 1
        for status in (r.status for r in instance.ranks):
            print(f"exod: rank {status.rank} ready: canary {status.canary_seconds:.2f} s, max |d| "
                  f"{status.canary_max_delta:.1e}, peak {status.peak_rss_bytes / 1e6:.0f} MB "
                  f"(estimated {status.estimated_bytes / 1e6:.0f} MB)", file=log)
        request = pb.GenerateRequest(request_id="cli", messages=[pb.ChatMessage(role="user", content=args.prompt)],
                                     sampling=pb.SamplingParams(max_tokens=args.max_tokens,
                                                                temperature=args.temperature))
        try:
            for chunk in instance.stream(request, timeout=600):
                sys.stdout.write("".join(t.text for t in chunk.tokens))
                sys.stdout.flush()
        except LaunchError as e:
            print(f"\nexod: error: {e}", file=log)
            return 1
        print()
        if chunk.error:
            print(f"exod: error: {chunk.error}", file=log)
            return 1
        print(f"exod: {chunk.generation_tokens} tokens, prompt {chunk.prompt_tokens_per_s:.0f} tok/s, "
              f"decode {chunk.generation_tokens_per_s:.1f} tok/s", file=log)
        instance.shutdown()
    return 0


def cmd_run_rank(args) -> int:
    """One runner under this process: events out as JSON lines, commands in
    as JSON lines (RunnerCommand in proto3 JSON)."""
    import threading

    from exod.runner.launch import RankProcess

    spec = pb.RunnerSpec()
    try:
        json_format.Parse(Path(args.spec).read_text(), spec)
    except OSError as e:
        raise UsageError(f"cannot read {args.spec}: {e.strerror}") from None
    except json_format.ParseError as e:
        raise UsageError(f"{args.spec}: not a RunnerSpec: {e}") from None
    lock = threading.Lock()
    pending: set[str] = set()
    answered = threading.Condition(lock)

    def show(_, event):
        with lock:
            print(json.dumps(to_json(event)), flush=True)
            if event.HasField("chunk") and event.chunk.finish_reason:
                pending.discard(event.chunk.request_id)
                answered.notify_all()

    rank = RankProcess(spec, show)
    try:
        for line in sys.stdin:
            if not line.strip():
                continue
            command = pb.RunnerCommand()
            try:
                json_format.Parse(line, command)
            except json_format.ParseError as e:
                print(f"exod: error: not a RunnerCommand: {e}", file=sys.stderr)
                continue
            if command.HasField("generate"):
                with lock:
                    pending.add(command.generate.request_id)
            rank.send(command)
        # End of input: answer what was asked, then shut down.
        with lock:
            while pending and not rank.terminal.is_set():
                answered.wait(timeout=0.5)
        rank.send(pb.RunnerCommand(shutdown=pb.ShutdownRequest()))
        rank.terminal.wait()
    finally:
        rank.kill()
        rank.wait(10)
    return 0 if rank.status.state == pb.SHUTDOWN else 1


# ------------------------------------------------------------------ talking to the local daemon


def api_get(args, path: str):
    return api_call(args, "GET", path)


def api_call(args, method: str, path: str, body=None):
    """JSON to and from the local daemon; errors become one-line messages."""
    import urllib.error
    import urllib.request

    base = (args.api or os.environ.get("EXOD_API") or "http://127.0.0.1:52415").rstrip("/")
    headers = {"Content-Type": "application/json"}
    token = os.environ.get("EXOD_API_TOKEN")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=args.timeout if hasattr(args, "timeout") else 30) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = e.reason
        raise (ServiceFailed if e.code >= 500 else UsageError)(f"{e.code}: {message}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise UsageError(f"no exod daemon answers at {base} ({reason}); start one with `exod start`") from None


def cmd_place(args) -> int:
    import time

    body = {"model": args.model}
    for key in ("context_length", "concurrency", "strategy", "ranks", "restart_policy", "max_restarts",
                "prefix_cache_bytes"):
        if getattr(args, key) is not None:
            body[key] = getattr(args, key)
    if args.node:
        body["nodes"] = args.node
    instance = api_call(args, "POST", "/v1/instances", body)
    iid = instance["instance_id"]
    if not args.wait:
        print(json.dumps(instance, indent=2) if args.json else iid)
        return 0
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        instance = api_call(args, "GET", f"/v1/instances/{iid}")
        if instance["state"] in ("INSTANCE_READY", "INSTANCE_FAILED"):
            break
        time.sleep(0.5)
    if args.json:
        print(json.dumps(instance, indent=2))
    else:
        print(f"{iid} {instance['state'].removeprefix('INSTANCE_').lower()} {instance.get('reason', '')}".rstrip())
    return 0 if instance["state"] == "INSTANCE_READY" else 1


def download_text(runner: dict) -> str:
    """While a rank is Downloading: done/total, rate, source, ETA."""
    d = runner.get("download")
    if runner.get("state") != "DOWNLOADING" or not d:
        return ""
    done, total = int(d.get("bytes_done", 0)), int(d.get("bytes_total", 0))
    return (f" {done / 1e6:.0f}/{total / 1e6:.0f} MB at {float(d.get('rate_bytes_per_s', 0)) / 1e6:.1f} MB/s "
            f"from {d.get('source') or '?'}, eta {float(d.get('eta_s', 0)):.0f} s")


def cmd_instances(args) -> int:
    instances = api_call(args, "GET", "/v1/instances")["instances"]
    if args.json:
        print(json.dumps(instances, indent=2))
        return 0
    print(f"{'ID':14} {'MODEL':22} {'STRATEGY':10} {'STATE':9} RANKS")
    for i in instances:
        p = i["placement"]
        ranks = ", ".join(f"{r.get('rank', 0)}@{next((x['node_name'] for x in p['ranks'] if x.get('rank', 0) == r.get('rank', 0)), '?')}"
                          f" {r.get('state', '?').lower()}{download_text(r)}" for r in i.get("runners", []))
        print(f"{i['instance_id']:14} {p.get('model_id', '')[:22]:22} {p.get('strategy', '').lower():10} "
              f"{i['state'].removeprefix('INSTANCE_').lower():9} {ranks}")
        if i.get("reason"):
            print(f"{'':14} {i['reason']}")
    return 0


def holding_state(h: dict) -> str:
    shard = h.get("shard")
    if shard:
        layers = f" layers {shard.get('layer_start', 0)}-{shard.get('layer_end', 0)}" if shard.get("layer_end") else ""
        return f"shard {shard.get('strategy', '')} rank {shard.get('rank', 0)}/{shard.get('world_size', 0)}{layers}"
    return "complete" if h.get("complete") else "partial"


def cmd_ls(args) -> int:
    """Every node's models, as their records publish them."""
    state = api_get(args, "/v1/state")
    rows = []
    for n in state.get("nodes", []):
        p = n["record"]["profile"]
        for h in p.get("models", []):
            rows.append({"node": p.get("name", ""), "node_id": p["node_id"], "status": n.get("status", ""),
                         "model_id": h.get("model_id", ""), "revision": h.get("revision", ""),
                         "store": h.get("store", ""), "complete": bool(h.get("complete")),
                         "bytes": int(h.get("bytes", 0)), "files": h.get("files", []), "shard": h.get("shard"),
                         "state": holding_state(h)})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'NODE':16} {'MODEL':44} {'REVISION':9} {'STORE':10} {'FILES':>5} {'SIZE':>9}  STATE")
    for r in rows:
        print(f"{r['node'][:16]:16} {r['model_id'][:44]:44} {r['revision'][:8] or '-':9} {r['store']:10} "
              f"{len(r['files']):5} {r['bytes'] / 1e9:8.2f}G  {r['state']}")
    if not rows:
        print("no node holds a model yet (`exod pull MODEL` fetches one)")
    return 0


def _bar(done: int, total: int, width: int = 30) -> str:
    filled = int(width * done / total) if total else 0
    return "[" + "#" * filled + "." * (width - filled) + "]"


def cmd_pull(args) -> int:
    """A whole checkpoint onto a node, from its peers or the hub, with a
    progress bar on stderr."""
    import urllib.error
    import urllib.request

    base = (args.api or os.environ.get("EXOD_API") or "http://127.0.0.1:52415").rstrip("/")
    headers = {"Content-Type": "application/json"}
    if os.environ.get("EXOD_API_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['EXOD_API_TOKEN']}"
    body = {"model": args.model, **({"node": args.node} if args.node else {})}
    request = urllib.request.Request(base + "/v1/models/pull", data=json.dumps(body).encode(), method="POST",
                                     headers=headers)
    last = {}
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as response:
            for line in response:
                if not line.strip():
                    continue
                last = json.loads(line)
                d = last.get("download", {})
                done, total = int(d.get("bytes_done", 0)), int(d.get("bytes_total", 0))
                if not args.json and sys.stderr.isatty() or os.environ.get("EXOD_PROGRESS"):
                    print(f"\r{_bar(done, total)} {done / 1e9:6.2f}/{total / 1e9:.2f} GB "
                          f"{float(d.get('rate_bytes_per_s', 0)) / 1e6:7.1f} MB/s  eta {float(d.get('eta_s', 0)):5.0f} s"
                          f"  {d.get('source', '')[:40]}", end="", file=sys.stderr, flush=True)
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = e.reason
        raise (ServiceFailed if e.code >= 500 else UsageError)(f"{e.code}: {message}") from None
    except (urllib.error.URLError, OSError) as e:
        raise UsageError(f"no exod daemon answers at {base} ({getattr(e, 'reason', e)})") from None
    if not args.json and (sys.stderr.isatty() or os.environ.get("EXOD_PROGRESS")):
        print(file=sys.stderr)
    if args.json:
        print(json.dumps(last, indent=2))
    if last.get("error") or not last.get("done"):
        if not args.json:
            print(f"exod: error: {last.get('error') or 'the pull ended without an answer'}", file=sys.stderr)
        return 1
    if not args.json:
        print(f"{last.get('model_id')}@{(last.get('revision') or '-')[:12]} is on {last.get('node') or 'the node'}")
    return 0


def cmd_rm(args) -> int:
    answer = api_call(args, "DELETE", f"/v1/instances/{args.instance_id}")
    print(json.dumps(answer) if args.json else f"removed {answer['deleted']}")
    return 0


def cmd_rebalance(args) -> int:
    answer = api_call(args, "POST", f"/v1/instances/{args.instance_id}/rebalance", {})
    if args.json:
        print(json.dumps(answer, indent=2))
    else:
        print(f"{answer['instance']['instance_id']} {answer['outcome']}")
    return 0


def cmd_chat(args) -> int:
    body = {"model": args.model, "messages": [{"role": "user", "content": args.prompt}],
            "max_tokens": args.max_tokens, "temperature": args.temperature}
    answer = api_call(args, "POST", "/v1/chat/completions", body)
    print(json.dumps(answer, indent=2) if args.json else answer["choices"][0]["message"]["content"])
    return 0


def _gb(value) -> str:
    return f"{int(value or 0) / 1e9:.1f}"


def cmd_nodes(args) -> int:
    state = api_get(args, "/v1/state")
    strangers = state.get("strangers", []) if args.all else []
    if args.json:
        print(json.dumps({"nodes": state.get("nodes", []), "strangers": strangers} if args.all
                         else state.get("nodes", []), indent=2))
        return 0
    print(f"{'NAME':16} {'STATUS':8} {'USABLE':>8} {'RESERVED':>9} {'FREE':>8} {'CORES':>5}  {'CHIP':28} ID")
    for n in state.get("nodes", []):
        p = n["record"]["profile"]
        me = " (this node)" if p["node_id"] == state.get("self_id") else ""
        print(f"{p.get('name', '')[:16]:16} {n.get('status', '?'):8} {_gb(p.get('memory_usable_bytes')):>7}G "
              f"{_gb(n.get('memory_reserved_bytes')):>8}G {_gb(_plannable(p, n)):>7}G {p.get('cores', 0):>5}  {p.get('chip', '')[:28]:28} "
              f"{p['node_id'][:12]}{me}")
    for s in strangers:  # seen on the network, never sent anything beyond a TLS handshake
        print(f"{'?':16} {'STRANGER':8} {s.get('address', '')}  seen, not a member: {s.get('reason', '')}"
              f"{' (says it is ' + s['node_id'][:12] + ')' if s.get('node_id') else ''}")
    return 0


def _plannable(profile: dict, node: dict) -> int:
    """What placements may still take on a node: its usable memory less what
    is reserved (the planner's own figure, daemon/state.cluster_for_planner),
    not the machine's free memory, which may exceed what exod may use."""
    return max(0, int(profile.get("memory_usable_bytes", 0)) - int(node.get("memory_reserved_bytes", 0)))


def cmd_status(args) -> int:
    state = api_get(args, "/v1/state")
    if args.json:
        print(json.dumps(state, indent=2))
        return 0
    nodes = state.get("nodes", [])
    names = {n["record"]["profile"]["node_id"]: n["record"]["profile"].get("name", "") for n in nodes}
    up = [n for n in nodes if n.get("status") == "UP"]
    print(f"cluster {state.get('cluster_id')}: {len(up)} of {len(nodes)} nodes up, "
          f"{_gb(sum(int(n['record']['profile'].get('memory_usable_bytes', 0)) for n in up))} GB usable")
    for n in nodes:
        p = n["record"]["profile"]
        me = " (this node)" if p["node_id"] == state.get("self_id") else ""
        print(f"  {p.get('name', '') or p['node_id'][:12]}{me}: {n.get('status', '?').lower()}, "
              f"{_gb(p.get('memory_usable_bytes'))} GB usable, {_gb(n.get('memory_reserved_bytes'))} GB reserved")
    for i in state.get("instances", []):
        rank0 = next((r for r in i.get("runners", []) if not r.get("rank")), {})
        serving = (f", batch {rank0.get('batch_size', 0)} of {rank0.get('max_batch', 0)}, "
                   f"queue {rank0.get('queue_depth', 0)}" if i.get("state") == "INSTANCE_READY" else "")
        print(f"  instance {i['instance_id']}: {i['placement'].get('model_id', '')} "
              f"{i['placement'].get('strategy', '').lower()} over {len(i['placement'].get('ranks', []))} ranks, "
              f"{i.get('state', '').removeprefix('INSTANCE_').lower()}{serving}")
    for link in state.get("links", []):
        rtt = link.get("rtt_s", 0) * 1000
        bandwidth = link.get("bandwidth_bytes_per_s", 0) / 1e6
        print(f"  {names.get(link['from_node'], link['from_node'][:8])} - {names.get(link['to_node'], link['to_node'][:8])}:"
              f" {rtt:.2f} ms, {bandwidth:.0f} MB/s via {link.get('from_address', '?')} -> {link.get('to_address', '?')}")
    return 0


# ------------------------------------------------------------------ start


def cmd_start(args) -> int:
    import asyncio
    import os

    # gRPC's C core would print its own copy of bind errors; exod reports them in one line.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")

    from . import logs
    from .config import ConfigError, load
    from .node import serve

    flags = {"name": args.name, "api_host": args.api_host, "api_port": args.api_port, "grpc_host": args.grpc_host,
             "grpc_port": args.grpc_port, "peers": args.peer, "interfaces": args.interface,
             "data_dir": args.data_dir, "memory_limit": args.memory_limit, "cluster": args.cluster,
             "discovery": False if args.no_discovery else None, "down_after_s": args.down_after,
             "prestart_runner": False if args.no_prestart else None, "api_allowed_hosts": args.allow_host,
             "cluster_key": args.cluster_key, "cluster_key_file": args.cluster_key_file,
             "models_dirs": args.models_dir, "max_queue": args.max_queue}
    try:
        settings = load(flags, args.config)
    except ConfigError as e:
        raise UsageError(str(e)) from None
    logs.configure(args.log_level)
    from .keys import ClusterKeyError

    try:
        asyncio.run(serve(settings))
    except ClusterKeyError as e:
        raise UsageError(str(e)) from None
    except OSError as e:
        raise UsageError(f"cannot start: {e}") from None
    return 0


def cmd_key(args) -> int:
    from . import keys

    if args.action == "new":
        print(keys.new_cluster_key())
        return 0
    # The public fingerprint mDNS announces: compares two machines' keys without showing either.
    try:
        raw = keys.parse_cluster_key(sys.stdin.readline()) if args.file == "-" else keys.read_key_file(Path(args.file))
    except keys.ClusterKeyError as e:
        raise UsageError(str(e)) from None
    print(keys.derive_ca(raw).fingerprint)
    return 0


# ------------------------------------------------------------------ calibrate


def cmd_calibrate(args) -> int:
    from pathlib import Path

    from . import calibration
    from .paths import data_dir

    if args.busy < 1:
        raise UsageError(f"--busy must be at least 1, got {args.busy}")
    where = Path(args.data_dir).expanduser() if args.data_dir else data_dir()
    try:
        result = calibration.calibrate(busy=args.busy, quick=args.quick)
    except calibration.CalibrationError as e:
        raise UsageError(str(e)) from None
    path = calibration.save(where, result)
    if args.json:
        from google.protobuf import json_format

        print(json_format.MessageToJson(result, preserving_proto_field_name=True))
    else:
        print(f"decode: {result.decode_bytes_per_s / 1e9:.2f} GB/s read, {result.step_s * 1e3:.2f} ms per step, "
              f"{result.layer_s * 1e3:.3f} ms per layer (fit within {result.fit_worst_error:.0%}); "
              f"collective: {result.collective_s * 1e6:.0f} us")
        print(f"saved to {path}; `exod start` publishes it from now on")
    return 0


# ------------------------------------------------------------------ entry


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="exod", description="One machine for a large LLM, made of several.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("models", help="list the built-in model catalog")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("inspect", help="tensor inventory of a model")
    p.add_argument("model", help="Hugging Face repo id (org/name[@revision]), catalog id, built-in model or "
                                 "model directory, from this machine's stores")
    p.add_argument("--data-dir", help="the exod store's data dir (default: the XDG data dir)")
    p.add_argument("--models-dir", action="append", help="another folder of org/name checkpoints (repeatable)")
    p.add_argument("--tensors", action="store_true", help="list every tensor")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("plan", help="plan a placement offline")
    p.add_argument("model", help="Hugging Face repo id, catalog id, built-in model or model directory")
    p.add_argument("--data-dir", help="the exod store's data dir (default: the XDG data dir)")
    p.add_argument("--models-dir", action="append", help="another folder of org/name checkpoints (repeatable)")
    p.add_argument("--cluster", help="cluster JSON (see examples/cluster.json)")
    p.add_argument("--nodes", type=int, help="that many identical nodes (default 2)")
    p.add_argument("--memory", default="128GB", help="usable memory per node with --nodes")
    p.add_argument("--bandwidth", help="memory bandwidth per node with --nodes, bytes/s (default 400GB)")
    p.add_argument("--context", type=int)
    p.add_argument("--concurrency", type=int)
    p.add_argument("--strategy", choices=["pipeline", "moe_tensor", "tensor", "moe_experts", "hybrid"])
    p.add_argument("--backend", choices=["ring", "jaccl"])
    p.add_argument("--only", action="append", metavar="NODE", help="restrict to these nodes (repeatable)")
    p.add_argument("--headroom", type=float, help="fraction of usable memory to leave free")
    p.add_argument("--routing", metavar="FILE", help="routing counts to place moe_experts' experts by (JSON: a "
                                                     "runner's expert_counts, from GET /v1/instances/ID)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)

    for name, func, text in (("status", cmd_status, "the cluster as the local daemon sees it: nodes, instances and links"),
                             ("nodes", cmd_nodes, "the nodes the local daemon knows, with status and memory")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--api", help="the daemon's HTTP API (default $EXOD_API or http://127.0.0.1:52415)")
        p.add_argument("--json", action="store_true")
        if name == "nodes":
            p.add_argument("--all", action="store_true", help="also daemons seen that are not members")
        p.set_defaults(func=func)

    def api_parser(name, func, text):
        p = sub.add_parser(name, help=text)
        p.add_argument("--api", help="the daemon's HTTP API (default $EXOD_API or http://127.0.0.1:52415)")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=func)
        return p

    p = api_parser("place", cmd_place, "place a model on the cluster through the local daemon")
    p.add_argument("model", help="catalog id, model directory (on every chosen node) or built-in model")
    p.add_argument("--strategy", choices=["pipeline", "moe_tensor", "tensor", "moe_experts", "hybrid"])
    p.add_argument("--context-length", type=int)
    p.add_argument("--concurrency", type=int, help="sequences decoded at once (default 8): the KV of that many "
                                                    "contexts is reserved")
    p.add_argument("--prefix-cache", dest="prefix_cache_bytes", type=parse_size,
                   help="bytes of the model's KV the prefix cache may hold (default: one context; 0: off)")
    p.add_argument("--node", action="append", help="restrict to these nodes (repeatable)")
    p.add_argument("--ranks", type=int, help="exactly this many ranks (default: the planner chooses)")
    p.add_argument("--restart", dest="restart_policy", choices=["never", "replace"],
                   help="when it fails: stay failed (default), or be planned and placed again on the nodes up")
    p.add_argument("--max-restarts", type=int, help="with --restart replace (default 3)")
    p.add_argument("--wait", action="store_true", help="wait until Ready or Failed")
    p.add_argument("--timeout", type=float, default=600)
    api_parser("instances", cmd_instances, "instances and their ranks")
    api_parser("ls", cmd_ls, "every node's models: checkpoints and shards, with revision, files and state")
    p = api_parser("pull", cmd_pull, "fetch a whole checkpoint onto a node, from its peers or the hub")
    p.add_argument("model", help="Hugging Face repo id (org/name[@revision]), catalog id or built-in model")
    p.add_argument("--node", help="the node to fetch it onto (name or id; default: the local daemon's)")
    p.add_argument("--timeout", type=float, default=24 * 3600)
    p = api_parser("rm", cmd_rm, "stop an instance on every node and release its memory")
    p.add_argument("instance_id")
    p = api_parser("rebalance", cmd_rebalance, "place a moe_experts instance's experts again by measured routing "
                                               "load; the new placement is Ready before the old one stops")
    p.add_argument("instance_id")
    p.add_argument("--timeout", type=float, default=900, help="seconds to wait for the new placement")
    p = api_parser("chat", cmd_chat, "one chat completion from a Ready instance")
    p.add_argument("model")
    p.add_argument("prompt")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)

    p = sub.add_parser("start", help="run the daemon on this machine")
    p.add_argument("--name", help="node name (default: the host name)")
    p.add_argument("--api-host", help="HTTP API address (default 127.0.0.1)")
    p.add_argument("--api-port", type=int, help="HTTP API port (default 52415; 0 picks a free one)")
    p.add_argument("--allow-host", action="append", metavar="NAME",
                   help="a Host name the HTTP API also answers, e.g. mybox.lan (repeatable; loopback names "
                        "and this node's addresses are always allowed)")
    p.add_argument("--grpc-host", help="peer gRPC address (default 0.0.0.0)")
    p.add_argument("--grpc-port", type=int, help="peer gRPC port (default 52416; 0 picks a free one)")
    p.add_argument("--peer", action="append", metavar="HOST:PORT", help="static peer (repeatable)")
    p.add_argument("--interface", action="append", metavar="IF", help="advertise only these interfaces")
    p.add_argument("--data-dir", help="node id and caches (default: the XDG data dir)")
    p.add_argument("--models-dir", action="append", metavar="DIR",
                   help="another folder of checkpoints in the org/name layout, e.g. ~/.lmstudio/models (repeatable)")
    p.add_argument("--memory-limit", help="most memory exod may plan onto this node, e.g. 96GB")
    p.add_argument("--cluster", help="cluster id; nodes of other clusters are ignored (default: default)")
    p.add_argument("--no-discovery", action="store_true", help="no mDNS; static peers only")
    p.add_argument("--no-prestart", action="store_true",
                   help="start runner processes only when a rank is placed (saves ~80 MB, costs ~1 s per start)")
    p.add_argument("--down-after", type=float, help="seconds without heartbeats before a node is Down (3)")
    p.add_argument("--max-queue", type=int, metavar="N",
                   help="requests that may wait for an instance's batch; more get 429 (default 64, 0-4096)")
    p.add_argument("--cluster-key", help="the cluster's key (`exod key new`; or $EXOD_CLUSTER_KEY); "
                   "default: --cluster-key-file, else one made in the data dir on first start")
    p.add_argument("--cluster-key-file", help="a file holding the cluster's key")
    p.add_argument("--config", help="TOML config file (default: $XDG_CONFIG_HOME/exod/config.toml)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_start)

    p = sub.add_parser("key", help="cluster keys: make one, or show a key's public fingerprint")
    p.add_argument("action", choices=["new", "fingerprint"])
    p.add_argument("file", nargs="?", default="-", help="with fingerprint: the key file (- reads stdin)")
    p.set_defaults(func=cmd_key)

    p = sub.add_parser("calibrate", help="measure this node's decode and collective costs for the planner")
    p.add_argument("--data-dir", help="where to keep calibration.json (default: the XDG data dir)")
    p.add_argument("--busy", type=int, default=1,
                   help="ranks decoding at once (more than 1 only where emulated hosts share this machine)")
    p.add_argument("--quick", action="store_true", help="fewer, shorter timings")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("run", help="run a model as local ranks over loopback and answer one prompt")
    p.add_argument("model", help="built-in model (demo, midsize-moe), model directory, or a checkpoint in this "
                                 "machine's stores (Hugging Face repo id, catalog id)")
    p.add_argument("--data-dir", help="the exod store's data dir (default: the XDG data dir)")
    p.add_argument("--models-dir", action="append", help="another folder of org/name checkpoints (repeatable)")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--strategy", choices=["pipeline", "moe_tensor", "tensor", "moe_experts", "hybrid"],
                   help="default: the planner's choice")
    p.add_argument("--prompt", default="Hello! What is a cluster?")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--load-timeout", type=float, default=600)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("run-rank", help="run one runner rank from a RunnerSpec; JSON lines in and out")
    p.add_argument("--spec", required=True, help="RunnerSpec as proto3 JSON")
    p.set_defaults(func=cmd_run_rank)
    return parser


def main(argv=None) -> int:
    from exod.placement import PlanError

    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except (UsageError, ModelError, PlanError) as e:
        print(f"exod: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ServiceFailed as e:
        print(f"exod: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
