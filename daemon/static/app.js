// The dashboard: polls /v1/state every second and draws it. Every string
// that comes from the cluster (node names, instance ids, models, reasons)
// was written by some peer, so it only ever reaches the page as text: DOM
// nodes and textContent, never parsed as HTML, no inline handlers. The page
// runs under a CSP without inline script (see daemon/http_api.py).
"use strict";

const token = document.querySelector('meta[name="exod-page-token"]').content;
const gb = b => (Number(b || 0) / 1e9).toFixed(1) + " GB";
const mb = b => (Number(b || 0) / 1e6).toFixed(0) + " MB";
const word = s => String(s || "").replace(/^INSTANCE_/, "").toLowerCase().replace(/_/g, " ");
const plainWords = {DOWNLOADING: "Downloading", READY: "Ready", FAILED: "Failed", LOADING: "Loading", WARMING_UP: "Warming up", CONNECTING: "Connecting",
  CONNECTED: "Connected", LOADED: "Loaded", IDLE: "Idle", RUNNING: "Running", SHUTTING_DOWN: "Shutting down", SHUTDOWN: "Shut down"};
const $ = selector => document.querySelector(selector);

// el("td", {className: "state", data: {rank: 1}}, "text", child, ...): children are text or nodes.
function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (key === "data") for (const [name, v] of Object.entries(value)) node.setAttribute(`data-${name}`, String(v));
    else if (key === "style") Object.assign(node.style, value);
    else node[key] = value;
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined && child !== false) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function nodeRow(n, self) {
  const p = n.record.profile, total = Number(p.memory_total_bytes || 0) || 1;
  // The machine's memory as /metrics counts it: used is total less
  // available. Reserved is what placements hold; the part of it not yet in
  // use is drawn out of the available memory. "free" is what placements may
  // still take, as `exod nodes` says: usable less reserved.
  const available = Number(n.memory_available_bytes || p.memory_available_bytes || 0);
  const reserved = Number(n.memory_reserved_bytes || 0);
  const used = Math.max(0, total - available);
  const pending = Math.min(reserved, available);
  const free = Math.max(0, Number(p.memory_usable_bytes || 0) - reserved);
  const pct = v => (100 * v / total).toFixed(1) + "%";
  return el("tr", {data: {node: p.name || ""}},
    el("td", {}, p.name, p.node_id === self ? [" ", el("span", {className: "muted"}, "(this node)")] : null),
    el("td", {className: `state ${n.status}`}, word(n.status)),
    el("td", {},
      el("div", {className: "bar", title: `used ${gb(used)}, reserved ${gb(reserved)}, free ${gb(free)}`},
        el("span", {className: "used", style: {width: pct(used)}}),
        el("span", {className: "reserved", style: {width: pct(pending)}}),
        el("span", {className: "free", style: {width: pct(Math.max(0, available - pending))}})),
      el("span", {className: "muted"}, `${gb(used)} · ${gb(reserved)} · ${gb(free)}`)),
    el("td", {}, gb(p.memory_usable_bytes)),
    el("td", {}, p.chip));
}

// While a rank's node fetches its bytes: done/total, rate, from where, ETA.
function downloadText(d) {
  const rate = Number(d.rate_bytes_per_s || 0);
  return ` ${mb(d.bytes_done)} / ${mb(d.bytes_total)} at ${(rate / 1e6).toFixed(1)} MB/s` +
    ` from ${d.source || "?"}, ${Math.round(Number(d.eta_s || 0))} s left`;
}

function rankLine(r, p, names) {
  const rp = (p.ranks || []).find(x => (x.rank || 0) === (r.rank || 0)) || {};
  const progress = r.state === "LOADING" ? ` ${r.layers_loaded || 0}/${r.total_layers || "?"}`
    : r.state === "DOWNLOADING" && r.download ? downloadText(r.download) : "";
  const measured = r.peak_rss_bytes ? mb(r.peak_rss_bytes) : "—";
  return el("div", {className: "rank", data: {rank: r.rank || 0}},
    `rank ${r.rank || 0} · ${rp.node_name || names[r.node_id] || "?"} · `,
    el("span", {className: `state ${r.state}`}, (plainWords[r.state] || word(r.state)) + progress),
    ` · ${mb(r.estimated_bytes || (rp.memory || {}).total_bytes)} / ${measured} `,
    r.reason ? el("div", {className: "reason"}, r.reason) : null);
}

// Rank 0 owns the queue and the clock; the batch is the same on every rank;
// each rank caches its own shard of the prefix cache, so its bytes are summed.
function servingCell(i) {
  const runners = i.runners || [];
  const r0 = runners.find(r => (r.rank || 0) === 0) || {};
  const cache = r0.prefix_cache || {};
  const cacheBytes = runners.reduce((sum, r) => sum + Number((r.prefix_cache || {}).bytes || 0), 0);
  const lookups = Number(cache.lookups || 0), hits = Number(cache.hits || 0);
  return el("td", {className: "serving"},
    el("div", {data: {field: "tokens-per-s"}}, `${Number(r0.tokens_per_s || 0).toFixed(1)} tok/s`),
    el("div", {data: {field: "batch"}}, `batch ${r0.batch_size || 0} / ${r0.max_batch || (i.placement || {}).concurrency || 0}`),
    el("div", {data: {field: "queue"}}, `queue ${r0.queue_depth || 0}`),
    el("div", {className: "muted", data: {field: "prefix-cache"}},
      `cache ${hits}/${lookups} hits · ${mb(cacheBytes)}`));
}

function instanceRow(i, names) {
  const p = i.placement || {};
  return el("tr", {data: {instance: i.instance_id || ""}},
    el("td", {}, i.instance_id),
    el("td", {}, p.model_id),
    el("td", {}, `${word(p.strategy)} · ${word(p.backend)}`),
    el("td", {className: `state ${i.state}`}, word(i.state),
      i.reason ? el("div", {className: "reason"}, i.reason) : null,
      i.replaced_by ? el("div", {className: "muted"}, `replaced by ${i.replaced_by}`) : null,
      i.replaces ? el("div", {className: "muted"}, `restart ${i.restarts} of ${i.replaces}`) : null),
    servingCell(i),
    el("td", {}, (i.runners || []).map(r => rankLine(r, p, names))),
    el("td", {}, el("button", {type: "button", data: {action: "delete"}}, "Delete")));
}

// One row per checkpoint a node publishes: peers wrote these, so text only.
function modelRows(n) {
  const p = n.record.profile;
  return (p.models || []).map(h => {
    const s = h.shard;
    const what = s ? `shard · ${s.strategy || ""} rank ${s.rank || 0}/${s.world_size || 0}` +
      (s.layer_end ? ` · layers ${s.layer_start || 0}-${s.layer_end}` : "") : (h.complete ? "complete" : "partial");
    return el("tr", {data: {node: p.name || "", model: h.model_id || ""}},
      el("td", {}, p.name),
      el("td", {}, h.model_id),
      el("td", {className: "muted"}, (h.revision || "").slice(0, 8) || "—"),
      el("td", {}, h.store),
      el("td", {}, String((h.files || []).length)),
      el("td", {}, gb(h.bytes)),
      el("td", {className: h.complete ? "fits" : "muted"}, what));
  });
}

function linkRow(l, names) {
  return el("tr", {},
    el("td", {}, `${names[l.from_node] || ""} – ${names[l.to_node] || ""}`),
    el("td", {}, `${(1000 * (l.rtt_s || 0)).toFixed(2)} ms`),
    el("td", {}, `${((l.bandwidth_bytes_per_s || 0) / 1e6).toFixed(0)} MB/s`),
    el("td", {className: "muted"}, `${l.from_address || ""} → ${l.to_address || ""}`));
}

// A daemon seen on the network that is not a member (another cluster key,
// or none): shown so that people notice, never contacted beyond a handshake.
function strangerRow(x) {
  return el("tr", {data: {stranger: x.address || ""}},
    el("td", {}, x.address || ""),
    el("td", {}, x.reason || ""),
    el("td", {className: "muted"}, (x.node_id || "").slice(0, 12)),
    el("td", {className: "muted"}, x.last_seen_unix_ms ? new Date(Number(x.last_seen_unix_ms)).toLocaleTimeString() : ""));
}

async function refresh() {
  try {
    const s = await (await fetch("/v1/state")).json();
    const nodes = s.nodes || [];
    const names = Object.fromEntries(nodes.map(n => [n.record.profile.node_id, n.record.profile.name]));
    const up = nodes.filter(n => n.status === "UP").length;
    $("#summary").textContent = `cluster ${s.cluster_id} · ${up} of ${nodes.length} nodes up · updated ${new Date().toLocaleTimeString()}`;
    $("#nodes tbody").replaceChildren(...nodes.map(n => nodeRow(n, s.self_id)));
    $("#links tbody").replaceChildren(...(s.links || []).map(l => linkRow(l, names)));
    $("#models tbody").replaceChildren(...nodes.flatMap(modelRows));
    const strangers = s.strangers || [];
    $("#strangers").hidden = strangers.length === 0;
    $("#strangers tbody").replaceChildren(...strangers.map(strangerRow));
    $("#instances tbody").replaceChildren(...(s.instances || []).map(i => instanceRow(i, names)));
    chatModels(s.instances || []);
  } catch (e) {
    $("#summary").textContent = "the daemon does not answer: " + e;
  }
}

function body() {
  const b = {model: $("#model").value.trim()};
  const strategy = $("#strategy").value, ranks = Number($("#ranks").value), context = Number($("#context").value);
  if (strategy) b.strategy = strategy;
  if (ranks > 0) b.ranks = ranks;
  if (context > 0) b.context_length = context;
  return b;
}

// Changes carry the page token; the daemon refuses a browser's change without it.
async function send(method, path, payload) {
  const headers = {"X-Exod-Page-Token": token};
  if (payload !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, {method, headers, body: payload === undefined ? undefined : JSON.stringify(payload)});
  const data = await r.json();
  if (!r.ok) throw new Error(data.error ? data.error.message : r.statusText);
  return data;
}

function candidateRow(c) {
  return el("tr", {},
    el("td", {}, word(c.strategy)),
    el("td", {}, c.ranks.map(r => `${r.rank || 0}→${r.node_name}`).join(", ")),
    // A candidate rejected for a reason other than memory carries no estimates.
    el("td", {}, c.rejected ? "–" : c.ranks.map(r => gb((r.memory || {}).total_bytes)).join(" / ")),
    el("td", {}, c.rejected ? "–" : `${(c.predicted_decode_tokens_per_s || 0).toFixed(1)} tok/s`),
    el("td", {}, c.bytes_to_fetch ? `${gb(c.bytes_to_fetch)} · ~${Math.round(Number(c.predicted_transfer_s || 0))} s` +
      ` from ${[...new Set(c.ranks.flatMap(r => (r.transfer || {}).sources || []))].join(", ")}` : "—"),
    el("td", {className: c.fits ? "fits" : "nofit"}, c.fits ? "fits" : c.rejected ? "cannot run" : "does not fit",
      (c.reasons || []).map(r => el("div", {className: "muted"}, r))));
}

$("#place").addEventListener("submit", e => e.preventDefault());

$("#preview-button").addEventListener("click", async () => {
  const table = $("#candidates"), msg = $("#message");
  try {
    const plan = await send("POST", "/v1/placements/preview", body());
    table.hidden = false;
    table.querySelector("tbody").replaceChildren(...(plan.candidates || []).map(candidateRow));
    msg.textContent = plan.chosen ? `the planner would choose ${word(plan.chosen.strategy)} on ${plan.chosen.ranks.length} rank(s)`
                                  : (plan.reasons || []).join("; ");
  } catch (e) { msg.textContent = e.message; }
});

$("#place-button").addEventListener("click", async () => {
  const msg = $("#message");
  try { const i = await send("POST", "/v1/instances", body()); msg.textContent = `placed ${i.instance_id}`; refresh(); }
  catch (e) { msg.textContent = e.message; }
});

// One listener for every Delete button: the row says which instance.
$("#instances").addEventListener("click", async e => {
  const button = e.target.closest('button[data-action="delete"]');
  if (!button) return;
  const id = button.closest("tr").getAttribute("data-instance");
  try { await send("DELETE", `/v1/instances/${encodeURIComponent(id)}`); $("#message").textContent = `deleted ${id}`; }
  catch (err) { $("#message").textContent = err.message; }
  refresh();
});

// ------------------------------------------------------------------ chat
// Streams from POST /v1/chat/completions (server-sent events), the same API
// every OpenAI client uses; the conversation is resent each turn, so the
// next turn's prefill comes from the instance's prefix cache. The answer is
// appended as text only. Stop aborts the request, which ends the generation
// on every rank.

const conversation = [];
let aborter = null;

function chatModels(instances) {
  const select = $("#chat-model");
  const ready = [...new Set(instances.filter(i => i.state === "INSTANCE_READY").map(i => (i.placement || {}).model_id))]
    .filter(Boolean).sort();
  const shown = [...select.options].map(o => o.value);
  if (ready.join("\n") === shown.join("\n")) return;
  const chosen = select.value;
  select.replaceChildren(...ready.map(m => el("option", {value: m}, m)));
  if (ready.includes(chosen)) select.value = chosen;
}

function turn(role, text) {
  const body = el("span", {className: "text"}, text);
  $("#chat-log").append(el("div", {className: `turn ${role}`}, el("span", {className: "who"}, role), body));
  return body;
}

// The events of an SSE stream, as they arrive: "data: {...}" lines.
async function* events(response) {
  const reader = response.body.getReader(), decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of block.split("\n")) if (line.startsWith("data: ")) yield line.slice(6);
    }
  }
}

async function chat() {
  const model = $("#chat-model").value, text = $("#chat-input").value.trim(), status = $("#chat-status");
  if (!model || !text || aborter) { if (!model) status.textContent = "no model is Ready: place one first"; return; }
  conversation.push({role: "user", content: text});
  turn("user", text);
  $("#chat-input").value = "";
  const out = turn("assistant", "");
  aborter = new AbortController();
  $("#chat-send").disabled = true; $("#chat-stop").disabled = false;
  status.textContent = "…";
  const started = performance.now();
  let answer = "", tokens = 0, first = null;
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", signal: aborter.signal,
      headers: {"Content-Type": "application/json", "X-Exod-Page-Token": token},
      body: JSON.stringify({model, messages: conversation, stream: true,
                            temperature: Number($("#chat-temperature").value),
                            max_tokens: Number($("#chat-max-tokens").value)})});
    if (!r.ok) {
      const data = await r.json();
      throw new Error(data.error ? data.error.message : r.statusText);
    }
    let finish = null;
    for await (const data of events(r)) {
      if (data === "[DONE]") break;
      const event = JSON.parse(data);
      if (event.error) throw new Error(event.error.message);
      const choice = (event.choices || [])[0] || {};
      const piece = (choice.delta || {}).content || "";
      if (piece) {
        if (first === null) first = performance.now();
        answer += piece; tokens += 1;
        out.textContent = answer;
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
    conversation.push({role: "assistant", content: answer});
    const seconds = (performance.now() - started) / 1000;
    status.textContent = `done (${finish || "stop"}) · first token after ${((first || performance.now()) - started).toFixed(0)} ms · ${seconds.toFixed(1)} s`;
    out.parentNode.setAttribute("data-done", "true");
  } catch (e) {
    conversation.pop();
    status.textContent = e.name === "AbortError" ? "stopped" : e.message;
    out.parentNode.setAttribute("data-done", "error");
  } finally {
    aborter = null;
    $("#chat-send").disabled = false; $("#chat-stop").disabled = true;
  }
}

$("#chat").addEventListener("submit", e => { e.preventDefault(); chat(); });
$("#chat-stop").addEventListener("click", () => { if (aborter) aborter.abort(); });
$("#chat-clear").addEventListener("click", () => {
  conversation.length = 0; $("#chat-log").replaceChildren(); $("#chat-status").textContent = "";
});

refresh();
setInterval(refresh, 1000);
