// wsgate's admin page: polls the admin JSON endpoints once a second and draws them.
// No framework and no inline code (the page's CSP is default-src 'self'); every value
// from the server goes into the DOM as text, never as HTML.
"use strict";

const OUTCOMES = ["client_close", "backend_close", "close_timeout", "client_gone",
  "client_unresponsive", "client_stalled", "backend_gone", "backend_unresponsive",
  "idle_timeout", "max_lifetime", "shutdown", "protocol_error", "admin_close"];
const HTTP_OUTCOMES = ["completed", "client_aborted", "client_unresponsive", "client_stalled",
  "backend_aborted", "backend_unreachable", "backend_timeout", "stream_idle_timeout",
  "shutdown", "admin_close"];
// How an ending came about. A WebSocket: a side sent Close; wsgate ended it on purpose;
// wsgate had to detect a peer that vanished or went silent; the peer broke the protocol.
const KIND = {
  client_close: "clean", backend_close: "clean",
  idle_timeout: "policy", max_lifetime: "policy", shutdown: "policy", admin_close: "policy",
  protocol_error: "error",
};
// An HTTP exchange: it completed; the client cut it; the backend cut it (or never
// answered); wsgate's timer, drain or operator ended it.
const HTTP_KIND = {
  completed: "clean", client_aborted: "client",
  backend_aborted: "backend", backend_unreachable: "backend",
};
const kind = (o, k) => "k-" + (k === "http" ? HTTP_KIND[o] || "policy" : KIND[o] || "detected");

const $ = (id) => document.getElementById(id);
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text != null) e.textContent = String(text);
  return e;
}
const td = (cls, ...kids) => { const c = el("td", cls); c.append(...kids); return c; };

const num = (n) => (n == null ? "—" : Number(n).toLocaleString("en-US"));
function bytes(n) {
  if (n == null) return "—";
  const u = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + u[i];
}
// Short durations (release times, RTTs): µs, ms or s with about three digits.
function dur(s) {
  if (s == null || !isFinite(s)) return "—";
  const f = (v, unit) => parseFloat(v.toPrecision(3)) + " " + unit;
  if (s < 1e-3) return f(s * 1e6, "µs");
  if (s < 1) return f(s * 1e3, "ms");
  if (s < 60) return f(s, "s");
  return age(s);
}
// Long durations (ages, uptime): "12 s", "4 m 05 s", "3 h 12 m", "2 d 3 h".
function age(s) {
  if (s == null || !isFinite(s)) return "—";
  s = Math.max(0, Math.floor(s));
  const p = (n) => String(n).padStart(2, "0");
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " m " + p(s % 60) + " s";
  if (s < 86400) return Math.floor(s / 3600) + " h " + p(Math.floor(s / 60) % 60) + " m";
  return Math.floor(s / 86400) + " d " + Math.floor(s / 3600) % 24 + " h";
}
const secsAgo = (s) => (s == null ? "never" : s < 10 ? s.toFixed(1) + " s ago" : age(s) + " ago");
const hms = (d) => [d.getHours(), d.getMinutes(), d.getSeconds()].map((n) => String(n).padStart(2, "0")).join(":");
const plural = (n, one, many) => num(n) + " " + (n === 1 ? one : many);

/** Open exchanges drawn per refresh; wsgate sends the flagged ones first, then the oldest. */
const OPEN_ROWS = 200;
let paused = false, timer = null, summary = null, busy = false, updated = null;
let filter = "", kindFilter = "";
try {
  filter = localStorage.getItem("wsgate-outcome") || "";
  kindFilter = localStorage.getItem("wsgate-kind") || "";
} catch { /* storage off */ }
$("kind-filter").value = kindFilter;
if ($("kind-filter").value !== kindFilter) kindFilter = "";

async function getJSON(url) {
  let res;
  try { res = await fetch(url, { cache: "no-store" }); } catch (e) { throw new Error(url + ": " + e.message); }
  if (!res.ok) throw new Error(url + ": HTTP " + res.status + " " + (await res.text()).trim().slice(0, 200));
  return res.json();
}

async function refresh() {
  if (busy) return;
  busy = true;
  const query = [kindFilter && "kind=" + encodeURIComponent(kindFilter), filter && "outcome=" + encodeURIComponent(filter)].filter(Boolean);
  const recentUrl = "connections/recent" + (query.length ? "?" + query.join("&") : "");
  const got = await Promise.allSettled([getJSON("summary"), getJSON("connections?limit=" + OPEN_ROWS), getJSON(recentUrl)]);
  busy = false;
  const errors = got.filter((r) => r.status === "rejected").map((r) => r.reason.message || String(r.reason));
  const draw = [drawSummary, drawOpen, drawRecent];
  got.forEach((r, i) => {
    if (r.status !== "fulfilled") return;
    try { draw[i](r.value); } catch (e) { errors.push("unexpected data: " + e.message); }
  });
  const banner = $("error");
  banner.hidden = !errors.length;
  banner.textContent = errors.length ? "Cannot refresh (still trying every second): " + errors.join("; ") : "";
  if (!errors.length) updated = new Date();
  showUpdated();
}
function showUpdated() {
  $("updated").textContent = (updated ? "updated " + hms(updated) : "not updated yet") + (paused ? " · paused" : "");
}

// "release time, last 5 min (3 endings): p50 12 µs · p99 40 µs"
function releaseText(what, r) {
  r = r || {};
  const win = r.window_seconds % 60 ? age(r.window_seconds) : r.window_seconds / 60 + " min";
  return what + " release, last " + win + " (" + plural(r.count, "ending", "endings") + "): p50 " +
    (r.count ? dur(r.p50) : "—") + " · p99 " + (r.count ? dur(r.p99) : "—");
}

// The outcomes in `known` order, then any the server knows and this page does not.
const names = (known, ended) => known.concat(Object.keys(ended || {}).filter((k) => !known.includes(k)));

function chips(box, list, ended, k) {
  box.replaceChildren(...list.map((o) => {
    const n = (ended || {})[o] || 0;
    const chip = el("span", "chip " + kind(o, k) + (n ? "" : " zero"));
    chip.dataset.outcome = o;
    chip.dataset.kind = k;
    chip.append(el("b", null, num(n)), " " + o);
    return chip;
  }));
}

function drawSummary(s) {
  summary = s;
  $("version").textContent = "v" + s.version;
  $("uptime").textContent = "up " + age(s.uptime_seconds);
  $("draining").hidden = !s.draining;
  $("open-count").textContent = plural(s.open_websockets, "WebSocket", "WebSockets") + " · " +
    plural(s.open_http_streams || 0, "HTTP stream", "HTTP streams") + " open, of max " + num(s.max_connections) + " connections";
  $("ping").textContent = s.ping_interval_seconds == null ? "liveness pings off" : "ping every " + dur(s.ping_interval_seconds);
  $("release").textContent = releaseText("WebSocket", s.release_seconds);
  $("http-release").textContent = releaseText("HTTP", s.http_release_seconds);
  $("drain").hidden = !s.viewer_may_drain || s.draining;
  if (s.draining) $("drain-confirm").hidden = true;

  const ws = names(OUTCOMES, s.ended_by_outcome), http = names(HTTP_OUTCOMES, s.http_ended_by_outcome);
  chips($("totals"), ws, s.ended_by_outcome, "websocket");
  chips($("http-totals"), http, s.http_ended_by_outcome, "http");
  fillOutcomes(ws, http);
}

// The outcome filter offers the outcomes of the kind chosen; for both kinds, grouped:
// those of WebSockets only, of HTTP only, and those both can end with.
let outcomeLists = null;
function fillOutcomes(ws, http) {
  if (ws) outcomeLists = { ws, http };
  if (!outcomeLists) return;
  const group = (label, list) => {
    const g = el("optgroup");
    g.label = label;
    g.append(...list.map((o) => el("option", null, o)));
    return g;
  };
  let groups;
  if (kindFilter === "websocket") groups = [group("WebSocket", outcomeLists.ws)];
  else if (kindFilter === "http") groups = [group("HTTP", outcomeLists.http)];
  else {
    const both = outcomeLists.ws.filter((o) => outcomeLists.http.includes(o));
    groups = [group("WebSocket", outcomeLists.ws.filter((o) => !both.includes(o))),
      group("HTTP", outcomeLists.http.filter((o) => !both.includes(o))), group("WebSocket and HTTP", both)];
  }
  const select = $("outcome-filter");
  const key = kindFilter + ":" + groups.map((g) => g.label + "=" + [...g.children].map((o) => o.value).join(",")).join(";");
  if (select.dataset.key === key) return;
  select.dataset.key = key;
  const all = el("option", null, "all");
  all.value = "";
  select.replaceChildren(all, ...groups.filter((g) => g.children.length));
  select.value = filter;
  if (select.value !== filter) {
    filter = "";
    select.value = "";
  }
}

const FLAG_ORDER = ["client_not_reading", "client_not_answering", "backend_not_answering", "client_silent", "closing"];
function flagText(f, c) {
  const c2b = c.client_to_backend || {}, b2c = c.backend_to_client || {};
  const heard = (d) => (d.seconds_since_last_frame == null ? "" : ", last heard " + secsAgo(d.seconds_since_last_frame));
  switch (f) {
    case "client_silent": return (c2b.seconds_since_last_data == null ? "client sent no data" : "client silent " +
      age(c2b.seconds_since_last_data)) + " while the backend streams";
    case "client_not_answering": return "client not answering wsgate's Ping" + heard(c2b);
    case "backend_not_answering": return "backend not answering wsgate's Ping" + heard(b2c);
    case "client_not_reading": return "client not reading" +
      (c.seconds_client_not_reading == null ? "" : " for " + dur(c.seconds_client_not_reading));
    case "closing": return (c.kind === "http" ? "ending" : "closing handshake") + (c.outcome ? ": " + c.outcome : "");
    default: return f.replace(/_/g, " ");
  }
}

// Bytes (and frames, for a WebSocket) one way, and when data last came.
function direction(d, http, cls) {
  d = d || {};
  const cell = td("dir " + cls, bytes(d.bytes) + (http ? "" : " · " + num(d.frames) + " fr"));
  const last = d.seconds_since_last_data !== undefined ? d.seconds_since_last_data : d.seconds_since_last_frame;
  cell.append(el("div", "sub", http && last == null ? "no body bytes yet" : (http ? "body " : "data ") + secsAgo(last)));
  return cell;
}

function kindBadge(c) {
  const cell = td("kind");
  cell.append(el("span", "badge-kind b-" + (c.kind === "http" ? "http" : "ws"), c.kind === "http" ? "HTTP" : "WS"));
  if (c.event_stream) cell.append(el("div", "sub", "SSE"));
  return cell;
}

function drawOpen(conns) {
  const flagged = (c) => (c.flags && c.flags.length ? 0 : 1);
  conns.sort((a, b) => flagged(a) - flagged(b) || a.id - b.id);
  const mayClose = summary && summary.viewer_may_close;
  const rows = conns.map((c) => {
    const http = c.kind === "http";
    const tr = el("tr");
    tr.dataset.id = c.id;
    tr.dataset.kind = c.kind || "websocket";
    const rank = (f) => (FLAG_ORDER.includes(f) ? FLAG_ORDER.indexOf(f) : 99);
    const flags = (c.flags || []).slice().sort((a, b) => rank(a) - rank(b));
    if (flags.length) tr.className = "flagged " + flags.map((f) => "f-" + f).join(" ");
    const who = td("who", c.client);
    who.append(el("div", "sub", (http ? c.method + " " : "") + c.path + " · worker " + c.worker +
      (http ? " · connection " + c.connection : "")));
    const state = c.state === "closing" ? "closing" + (c.outcome ? ": " + c.outcome : "") : c.state;
    const chipCell = td("flags", ...flags.map((f) => el("span", "flag f-" + f, flagText(f, c))));
    const action = td("act");
    if (mayClose && c.state !== "closing") {
      const b = el("button", "small", "Close…");
      b.type = "button";
      b.addEventListener("click", () => askClose(c));
      action.append(b);
    }
    const detail = http
      ? td("num response", c.status + (c.event_stream ? " · event stream" : ""))
      : td("num", dur(c.client_ping_rtt_seconds) + " / " + dur(c.backend_ping_rtt_seconds));
    tr.append(td("num", c.id), kindBadge(c), who, td("num", age(c.age_seconds)), td(c.outcome ? kind(c.outcome, c.kind) : "", state),
      direction(c.client_to_backend, http, "c2b"), direction(c.backend_to_client, http, "b2c"), detail, chipCell, action);
    return tr;
  });
  if (!rows.length) rows.push(empty(10, "No open WebSockets or HTTP streams."));
  $("open").tBodies[0].replaceChildren(...rows);
  const n = conns.filter((c) => c.flags && c.flags.length).length;
  const open = summary ? summary.open_websockets + (summary.open_http_streams || 0) : 0;
  const total = Math.max(open, conns.length);
  const shown = total > conns.length ? num(conns.length) + " of " + num(total) + " shown, flagged first, then the oldest" : num(conns.length);
  $("open-note").textContent = "· " + shown + (n ? ", " + n + " flagged" : "");
}

function empty(span, text) {
  const c = td("empty", text);
  c.colSpan = span;
  const tr = el("tr");
  tr.append(c);
  return tr;
}

// A Close code as sent or received; "(wsgate)" when wsgate made that Close itself.
function code(cls, v, own) {
  const c = td(cls + (v == null ? " none" : ""), v == null ? "—" : v);
  if (v != null && own === v) {
    c.append(el("span", "by-wsgate", " (wsgate)"));
    c.title = "wsgate sent this Close itself";
  }
  return c;
}

// An HTTP exchange's request and response, in the place of a WebSocket's Close codes.
function httpDetail(r) {
  const c = td("http-detail");
  c.colSpan = 4;
  const part = (cls, text) => el("span", cls, text);
  c.append(part("method", r.method), " · ", part("status", r.status == null ? "no response" : r.status), " · ",
    part("framing", r.framing), r.event_stream ? " · event stream" : (r.stream ? " · stream" : ""),
    " · ", part("head", r.time_to_head_seconds == null ? "no head" : "head in " + dur(r.time_to_head_seconds)));
  if (r.heartbeats) c.append(" · " + plural(r.heartbeats, "heartbeat", "heartbeats"));
  return c;
}

function drawRecent(list) {
  const now = Date.now() / 1000;
  const shown = list.filter((r) => (!filter || r.outcome === filter) && (!kindFilter || (r.kind || "websocket") === kindFilter));
  const rows = shown.map((r) => {
    const http = r.kind === "http";
    const tr = el("tr");
    tr.dataset.id = r.id;
    tr.dataset.outcome = r.outcome;
    tr.dataset.kind = r.kind || "websocket";
    const who = td("who", r.client);
    who.append(el("div", "sub", r.path));
    const ended = td("num", secsAgo(Math.max(0, now - r.ended_at)));
    ended.title = new Date(r.ended_at * 1000).toLocaleString();
    const flow = (d) => td("num", bytes((d || {}).bytes) + (http ? "" : " · " + num((d || {}).frames) + " fr"));
    const middle = http
      ? [httpDetail(r)]
      : [code("client-sent", r.client_sent_code), code("client-got", r.client_received_code, r.wsgate_to_client_code),
        code("backend-sent", r.backend_sent_code), code("backend-got", r.backend_received_code, r.wsgate_to_backend_code)];
    tr.append(td("num", r.id), kindBadge(r), who, td("outcome", el("span", "tag " + kind(r.outcome, r.kind), r.outcome)), ended,
      td("num duration", dur(r.duration_seconds)), td("num release", dur(r.release_seconds)), ...middle,
      flow(r.client_to_backend), flow(r.backend_to_client));
    return tr;
  });
  const what = [kindFilter === "http" ? "HTTP" : kindFilter === "websocket" ? "WebSocket" : "", filter].filter(Boolean).join(" ");
  if (!rows.length) rows.push(empty(13, what ? "No recent " + what + " endings." : "Nothing has ended yet."));
  $("recent").tBodies[0].replaceChildren(...rows);
  $("recent").dataset.kind = kindFilter;
  $("recent-note").textContent = "· newest first, " + shown.length + (what ? " " + what : "");
}

// The Close dialog for one connection: a WebSocket gets a Close with a code and reason;
// an HTTP stream has no Close frame, it is cut on both sides.
let closing = null;
function askClose(c) {
  closing = c;
  const http = c.kind === "http";
  $("close-title").textContent = (http ? "Cut HTTP stream #" + c.id + " (" + c.client + " " + c.method + " " : "Close connection #" + c.id + " (" + c.client + " ") + c.path + ")";
  $("close-what").textContent = http
    ? "wsgate cuts this stream on both sides: toward the client RST_STREAM (HTTP/2) or the connection closed (HTTP/1.1), toward the backend its connection closed. It is recorded as admin_close. An HTTP stream has no Close code or reason."
    : "wsgate sends this Close to both the client and the backend.";
  $("close-fields").hidden = http;
  $("close-code").required = !http;
  $("close-send").textContent = http ? "Cut stream" : "Send Close";
  $("close-error").hidden = true;
  $("close-dialog").showModal();
  (http ? $("close-send") : $("close-code")).focus();
}
const sendable = (n) => Number.isInteger(n) && ((n >= 1000 && n <= 1003) || (n >= 1007 && n <= 1014) || (n >= 3000 && n <= 4999));
async function sendClose(ev) {
  ev.preventDefault();
  const err = $("close-error");
  const show = (t) => { err.textContent = t; err.hidden = false; };
  let init = { method: "POST" };
  if (closing.kind !== "http") {
    const codeValue = Number($("close-code").value);
    const reason = $("close-reason").value;
    if (!sendable(codeValue)) return show("Code " + $("close-code").value + " cannot be sent: use 1000–1003, 1007–1014 or 3000–4999.");
    if (new TextEncoder().encode(reason).length > 123) return show("The reason is longer than 123 bytes.");
    init = { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ code: codeValue, reason }) };
  }
  try {
    const res = await fetch("connections/" + encodeURIComponent(closing.id) + "/close", init);
    if (!res.ok) return show("wsgate answered " + res.status + ": " + (await res.text()).trim());
    $("close-dialog").close();
    refresh();
  } catch (e) {
    show("Request failed: " + e.message);
  }
}

async function startDrain() {
  const out = $("drain-result");
  $("drain-confirm").hidden = true;
  out.hidden = false;
  out.textContent = "starting the drain…";
  try {
    const res = await fetch("drain", { method: "POST", headers: { "Content-Type": "application/json" }, body: "{}" });
    const text = await res.text();
    if (!res.ok) { out.textContent = "wsgate answered " + res.status + ": " + text.trim(); return; }
    let s = {};
    try { s = JSON.parse(text); } catch { /* keep the defaults */ }
    out.textContent = "Drain started: " + num(s.open_websockets) + " WebSockets open, closing within " + dur(s.spread_seconds) + "; deadline in " + dur(s.seconds_to_deadline) + ".";
  } catch (e) {
    out.textContent = "Request failed: " + e.message;
  }
  refresh();
}

function schedule() {
  clearTimeout(timer);
  if (!paused) timer = setTimeout(() => refresh().finally(schedule), 1000);
}

$("pause").addEventListener("click", () => {
  paused = !paused;
  $("pause").textContent = paused ? "Resume" : "Pause";
  $("pause").classList.toggle("on", paused);
  showUpdated();
  if (paused) clearTimeout(timer);
  else refresh().finally(schedule);
});
function remember(key, value) {
  try { localStorage.setItem(key, value); } catch { /* storage off */ }
}
$("outcome-filter").addEventListener("change", (e) => {
  filter = e.target.value;
  remember("wsgate-outcome", filter);
  refresh();
});
$("kind-filter").addEventListener("change", (e) => {
  kindFilter = e.target.value;
  remember("wsgate-kind", kindFilter);
  fillOutcomes();
  remember("wsgate-outcome", filter);
  refresh();
});
$("drain").addEventListener("click", () => { $("drain-confirm").hidden = false; });
$("drain-no").addEventListener("click", () => { $("drain-confirm").hidden = true; });
$("drain-go").addEventListener("click", startDrain);
$("close-form").addEventListener("submit", sendClose);
$("close-cancel").addEventListener("click", () => $("close-dialog").close());
refresh().finally(schedule);
