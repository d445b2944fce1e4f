// The demo page: each panel runs its query over its own WebSocket through wsgate (the
// search panel: a fetch of an event stream), and the event log shows how each query
// ended as the demo backend saw it. No framework,
// no inline code: the page's Content-Security-Policy is default-src 'self'.
"use strict";

// Abandoned sockets and stream readers stay referenced here for the life of the page, as
// in the original bug: an open WebSocket without listeners (or an unread stream) may
// otherwise be collected and closed.
const abandoned = [];

const secs = (ms) => (ms / 1000).toFixed(1) + " s";

function wsUrl(panel) {
  const url = new URL("/query?panel=" + encodeURIComponent(panel), location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  return url.href;
}

// What every panel has: its buttons, status line and bars, and the time since Run.
function panelUi(el) {
  const button = (act) => el.querySelector(`button[data-act="${act}"]`);
  const ui = { run: button("run"), cancel: button("cancel"), abandon: button("abandon"), t0: 0, max: 1, bars: new Map() };
  const status = el.querySelector(".status");
  const body = el.querySelector("tbody");
  ui.say = (text, cls) => { status.textContent = text; status.className = "status " + (cls || ""); };
  ui.running = (on) => { ui.run.disabled = on; ui.cancel.disabled = !on; ui.abandon.disabled = !on; };
  ui.elapsed = () => secs(performance.now() - ui.t0);
  ui.reset = () => {
    body.replaceChildren();
    ui.bars.clear();
    Object.assign(ui, { max: 1, t0: performance.now() });
    el.classList.remove("abandoned");
  };
  ui.show = (row) => {
    let bar = ui.bars.get(row.label);
    if (!bar) {
      const tr = document.createElement("tr");
      const label = document.createElement("td"), cell = document.createElement("td"), num = document.createElement("td");
      const fill = document.createElement("div");
      label.className = "label"; cell.className = "bar"; num.className = "num"; fill.className = "fill";
      label.textContent = row.label;
      cell.append(fill);
      tr.append(label, cell, num);
      body.append(tr);
      bar = { fill, num };
      ui.bars.set(row.label, bar);
    }
    ui.max = Math.max(ui.max, row.value);
    bar.num.textContent = row.count ? String(row.value) : row.value.toFixed(row.value < 100 ? 1 : 0);
    bar.fill.style.width = Math.round(100 * row.value / ui.max) + "%";
  };
  return ui;
}

// A panel whose query streams over a WebSocket of its own.
function setupPanel(el) {
  const name = el.dataset.panel;
  const ui = panelUi(el);
  const st = { ws: null, rows: 0, cancelled: false };

  ui.run.onclick = () => {
    ui.reset();
    Object.assign(st, { rows: 0, cancelled: false });
    const ws = new WebSocket(wsUrl(name));
    st.ws = ws;
    ui.running(true);
    ui.say("connecting…", "live");
    ws.onopen = () => ui.say("streaming…", "live");
    ws.onmessage = (e) => {
      let row;
      try { row = JSON.parse(e.data); } catch { return; }
      st.rows += 1;
      ui.show(row);
      ui.say(`streaming… ${st.rows} rows, ${ui.elapsed()}`, "live");
    };
    ws.onclose = (e) => {
      if (st.ws !== ws) return;
      st.ws = null;
      ui.running(false);
      if (st.cancelled) ui.say(`cancelled after ${ui.elapsed()} (${st.rows} rows); the backend answered the Close`);
      else if (e.code === 1000 && e.reason === "query complete") ui.say(`complete: ${st.rows} rows in ${ui.elapsed()}`);
      else if (!e.wasClean) ui.say(`connection lost without a Close after ${ui.elapsed()} (${st.rows} rows)`);
      else ui.say(`ended by the other side: ${e.code} "${e.reason}" after ${ui.elapsed()} (${st.rows} rows)`);
    };
  };

  ui.cancel.onclick = () => {
    if (!st.ws) return;
    st.cancelled = true;
    st.ws.close(1000, "cancelled");
    ui.say("cancelling…", "live");
  };

  ui.abandon.onclick = () => {
    const ws = st.ws;
    if (!ws) return;
    ws.onmessage = null;
    abandoned.push(ws);
    st.ws = null;
    ui.running(false);
    el.classList.add("abandoned");
    const at = ui.elapsed();
    ui.say(`abandoned at ${at}: not listening, socket left open. The backend keeps streaming.`, "abandoned");
    ws.onclose = (e) => {
      if (st.ws || !el.classList.contains("abandoned")) return;
      ui.say(`abandoned at ${at}; the backend closed it at ${ui.elapsed()} with ${e.code} "${e.reason}": every row went to nobody.`, "abandoned");
    };
  };
}

// The blocks of an event stream that are complete in `text`, and what is left over.
function sseBlocks(text) {
  const blocks = text.replace(/\r\n?/g, "\n").split("\n\n");
  const rest = blocks.pop();
  return {
    rest,
    events: blocks.map((block) => {
      const ev = { type: "message", data: [] };
      for (const line of block.split("\n")) {
        const colon = line.indexOf(":");
        if (colon === 0) continue; // a comment (wsgate's heartbeat)
        const field = colon < 0 ? line : line.slice(0, colon);
        const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") ev.type = value;
        else if (field === "data") ev.data.push(value);
      }
      ev.data = ev.data.join("\n");
      return ev;
    }).filter((ev) => ev.data !== ""),
  };
}

// The search panel: a fetch of an event stream, read with a ReadableStream reader, as
// OpenObserve's UI queries /_search_stream.
function setupSearch(el) {
  const ui = panelUi(el);
  let current = null;

  ui.run.onclick = async () => {
    ui.reset();
    const q = { abort: new AbortController(), reader: null, hits: 0, counts: new Map(), cancelled: false, abandoned: false, ended: false };
    current = q;
    ui.running(true);
    ui.say("connecting…", "live");
    try {
      const res = await fetch("/api/default/_search_stream", {
        method: "POST", cache: "no-store", signal: q.abort.signal,
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ query: { sql: "SELECT * FROM \"default\" WHERE level = 'error'", size: 800 } }),
      });
      if (!res.ok || !res.body) throw new Error("HTTP " + res.status);
      q.reader = res.body.getReader();
      if (q.abandoned) { abandoned.push(q.reader); return; }
      const decoder = new TextDecoder();
      let text = "";
      ui.say("streaming…", "live");
      for (;;) {
        const { value, done } = await q.reader.read();
        if (q.abandoned) return; // never read again; the reader stays referenced
        if (done) break;
        const got = sseBlocks(text + decoder.decode(value, { stream: true }));
        text = got.rest;
        for (const ev of got.events) {
          let data;
          try { data = JSON.parse(ev.data); } catch { continue; }
          if (ev.type === "search_response_hits") {
            for (const hit of data.hits || []) {
              q.hits += 1;
              const n = (q.counts.get(hit.service) || 0) + 1;
              q.counts.set(hit.service, n);
              ui.show({ label: hit.service, value: n, count: true });
            }
            ui.say(`streaming… ${q.hits} hits, ${ui.elapsed()}`, "live");
          } else if (ev.type === "search_response_end") {
            q.ended = true;
          }
        }
      }
      if (current !== q) return;
      ui.say(q.ended ? `complete: ${q.hits} hits in ${ui.elapsed()}` : `the stream ended without its end event after ${ui.elapsed()} (${q.hits} hits)`);
    } catch (e) {
      if (current !== q || q.abandoned) return;
      if (q.cancelled) ui.say(`cancelled after ${ui.elapsed()} (${q.hits} hits): fetch aborted, the browser closed the connection`);
      else ui.say(`cut after ${ui.elapsed()} (${q.hits} hits): the response ended before its end event (${e.message})`);
    } finally {
      if (current === q) { current = null; ui.running(false); }
    }
  };

  ui.cancel.onclick = () => {
    if (!current) return;
    current.cancelled = true;
    current.abort.abort();
    ui.say("cancelling…", "live");
  };

  ui.abandon.onclick = () => {
    const q = current;
    if (!q) return;
    q.abandoned = true;
    if (q.reader) abandoned.push(q.reader);
    current = null;
    ui.running(false);
    el.classList.add("abandoned");
    ui.say(`abandoned at ${ui.elapsed()} (${q.hits} hits): not reading, the stream left open. The backend keeps streaming.`, "abandoned");
  };
}

const LABELS = {
  started: "started", completed: "completed", client_close: "client Close",
  client_went_away: "went away", client_unresponsive: "unresponsive", client_stalled: "not reading",
  dropped: "no Close", stalled: "stalled", error: "error",
};

function eventRow(ev) {
  const tr = document.createElement("tr");
  const time = document.createElement("td"), query = document.createElement("td");
  const panel = document.createElement("td"), what = document.createElement("td");
  const d = new Date(ev.unix_ms);
  time.textContent = d.toLocaleTimeString([], { hour12: false }) + "." + Math.floor(d.getMilliseconds() / 100);
  query.textContent = ev.query == null ? "" : "#" + ev.query;
  panel.textContent = ev.panel + (ev.transport === "sse" ? " (SSE)" : "");
  const tag = document.createElement("span");
  const laptop = ev.kind.startsWith("laptop");
  tag.className = "tag t-" + (laptop ? "laptop" : ev.kind);
  tag.textContent = laptop ? "laptop" : (LABELS[ev.kind] || ev.kind);
  what.append(tag, ev.text);
  tr.append(time, query, panel, what);
  return tr;
}

let lastSeq = -1, polling = false;
async function poll() {
  if (polling) return;
  polling = true;
  const state = document.getElementById("log-state");
  try {
    const res = await fetch("/events", { cache: "no-store" });
    if (!res.ok) throw new Error("HTTP " + res.status);
    const events = await res.json();
    const top = events.length ? events[0].seq : 0;
    if (top !== lastSeq) {
      lastSeq = top;
      document.querySelector("#events tbody").replaceChildren(...events.map(eventRow));
    }
    state.textContent = events.length ? "· newest first" : "· nothing yet: run a query";
  } catch (e) {
    state.textContent = "· cannot reach the backend (" + e.message + ")";
  } finally {
    polling = false;
  }
}

async function vanish() {
  const out = document.getElementById("vanish-result");
  out.textContent = "starting…";
  try {
    const res = await fetch("/simulate/vanish", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: "{}",
    });
    const answer = await res.json();
    out.textContent = answer.message || answer.error || "HTTP " + res.status;
  } catch (e) {
    out.textContent = "failed: " + e.message;
  }
}

document.querySelectorAll(".panel").forEach((el) => (el.dataset.transport === "sse" ? setupSearch(el) : setupPanel(el)));
document.getElementById("reload").onclick = () => location.reload();
document.getElementById("vanish").onclick = vanish;
poll();
setInterval(poll, 1000);
