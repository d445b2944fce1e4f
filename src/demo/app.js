// The demo page: each panel runs its query over its own WebSocket through wsgate, and
// the event log shows how each query ended as the demo backend saw it. No framework,
// no inline code: the page's Content-Security-Policy is default-src 'self'.
"use strict";

// Abandoned sockets stay referenced here for the life of the page, as in the original
// bug: an open WebSocket without listeners may otherwise be collected and closed.
const abandoned = [];

const secs = (ms) => (ms / 1000).toFixed(1) + " s";

function wsUrl(panel) {
  const url = new URL("/query?panel=" + encodeURIComponent(panel), location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  return url.href;
}

function setupPanel(el) {
  const name = el.dataset.panel;
  const button = (act) => el.querySelector(`button[data-act="${act}"]`);
  const run = button("run"), cancel = button("cancel"), abandon = button("abandon");
  const status = el.querySelector(".status");
  const body = el.querySelector("tbody");
  const st = { ws: null, rows: 0, t0: 0, max: 1, bars: new Map(), cancelled: false };

  const say = (text, cls) => { status.textContent = text; status.className = "status " + (cls || ""); };
  const running = (on) => { run.disabled = on; cancel.disabled = !on; abandon.disabled = !on; };
  const elapsed = () => secs(performance.now() - st.t0);

  function show(row) {
    let bar = st.bars.get(row.label);
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
      st.bars.set(row.label, bar);
    }
    st.max = Math.max(st.max, row.value);
    bar.num.textContent = row.value.toFixed(row.value < 100 ? 1 : 0);
    bar.fill.style.width = Math.round(100 * row.value / st.max) + "%";
  }

  run.onclick = () => {
    body.replaceChildren();
    st.bars.clear();
    Object.assign(st, { rows: 0, max: 1, t0: performance.now(), cancelled: false });
    el.classList.remove("abandoned");
    const ws = new WebSocket(wsUrl(name));
    st.ws = ws;
    running(true);
    say("connecting…", "live");
    ws.onopen = () => say("streaming…", "live");
    ws.onmessage = (e) => {
      let row;
      try { row = JSON.parse(e.data); } catch { return; }
      st.rows += 1;
      show(row);
      say(`streaming… ${st.rows} rows, ${elapsed()}`, "live");
    };
    ws.onclose = (e) => {
      if (st.ws !== ws) return;
      st.ws = null;
      running(false);
      if (st.cancelled) say(`cancelled after ${elapsed()} (${st.rows} rows); the backend answered the Close`);
      else if (e.code === 1000 && e.reason === "query complete") say(`complete: ${st.rows} rows in ${elapsed()}`);
      else if (!e.wasClean) say(`connection lost without a Close after ${elapsed()} (${st.rows} rows)`);
      else say(`ended by the other side: ${e.code} "${e.reason}" after ${elapsed()} (${st.rows} rows)`);
    };
  };

  cancel.onclick = () => {
    if (!st.ws) return;
    st.cancelled = true;
    st.ws.close(1000, "cancelled");
    say("cancelling…", "live");
  };

  abandon.onclick = () => {
    const ws = st.ws;
    if (!ws) return;
    ws.onmessage = null;
    abandoned.push(ws);
    st.ws = null;
    running(false);
    el.classList.add("abandoned");
    const at = elapsed();
    say(`abandoned at ${at}: not listening, socket left open. The backend keeps streaming.`, "abandoned");
    ws.onclose = (e) => {
      if (st.ws || !el.classList.contains("abandoned")) return;
      say(`abandoned at ${at}; the backend closed it at ${elapsed()} with ${e.code} "${e.reason}": every row went to nobody.`, "abandoned");
    };
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
  panel.textContent = ev.panel;
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

document.querySelectorAll(".panel").forEach(setupPanel);
document.getElementById("reload").onclick = () => location.reload();
document.getElementById("vanish").onclick = vanish;
poll();
setInterval(poll, 1000);
