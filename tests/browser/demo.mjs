// A real browser through `wsgate demo`: Debian's Chromium, driven by playwright-core,
// ends queries the ways a user does (Cancel of a WebSocket query, closing a tab, Cancel of
// a search streamed as server-sent events) and checks what the demo backend and wsgate's
// admin page say about it. Run by tests/browser.rs:
//
//   WSGATE_DEMO_URL=http://127.0.0.1:8080/ WSGATE_ADMIN_URL=http://127.0.0.1:9090/ node demo.mjs
//
// Exits 0 with a summary of what it saw, or 1 saying what failed. Every wait is bounded;
// every request the browser makes must stay on loopback; any console error or uncaught
// page error fails the run.
import { chromium } from "playwright-core";

const DEMO = process.env.WSGATE_DEMO_URL;
const ADMIN = process.env.WSGATE_ADMIN_URL;
const CHROMIUM = process.env.WSGATE_CHROMIUM || "/usr/bin/chromium";
/** Bound on any single wait. */
const LIMIT = 15_000;
/** How long the admin page may take to show an ending (it polls once a second). */
const ADMIN_LIMIT = 10_000;

const LOOPBACK = new Set(["127.0.0.1", "localhost", "[::1]"]);
const seen = [];
const problems = [];
let recording = true;
const requests = { count: 0, hosts: new Set() };

function say(line) {
  seen.push(line);
  console.log("  " + line);
}

/** Fails the run at once (the caller's catch prints it). */
function fail(message) {
  throw new Error(message);
}

/** Records a URL the browser fetched or connected to; anything off loopback is a problem. */
function checkUrl(kind, raw) {
  if (!recording) return;
  requests.count += 1;
  let url;
  try {
    url = new URL(raw);
  } catch {
    problems.push(`${kind} to an unparsable URL: ${raw}`);
    return;
  }
  if (["data:", "about:", "blob:"].includes(url.protocol)) return;
  requests.hosts.add(url.host);
  if (!LOOPBACK.has(url.hostname)) problems.push(`${kind} off loopback: ${raw}`);
}

function watchContext(context) {
  context.on("request", (r) => checkUrl("request", r.url()));
  context.on("page", (page) => watchPage(page));
}

function watchPage(page) {
  const name = () => page.url() || "a new page";
  page.on("websocket", (ws) => checkUrl("WebSocket", ws.url()));
  page.on("console", (m) => {
    if (recording && m.type() === "error") problems.push(`console error on ${name()}: ${m.text()}`);
  });
  page.on("pageerror", (e) => recording && problems.push(`page error on ${name()}: ${e.message}`));
}

/** Polls `check` (async, returns a value or null) until it gives a value, at most `limit` ms. */
async function poll(what, check, limit = LIMIT) {
  const deadline = Date.now() + limit;
  let last;
  for (;;) {
    try {
      const v = await check();
      if (v != null && v !== false) return v;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) {
      fail(`timed out after ${limit / 1000} s waiting for ${what}` + (last ? ` (last error: ${last.message})` : ""));
    }
    await new Promise((r) => setTimeout(r, 200));
  }
}

/** The demo backend's event log, newest first, fetched through wsgate. */
async function events() {
  const res = await fetch(new URL("events", DEMO), { signal: AbortSignal.timeout(5_000) });
  if (!res.ok) fail(`GET /events answered ${res.status}`);
  return res.json();
}

/** Clicks Run on a panel and waits until it has streamed `rows` rows. */
async function runQuery(page, panelName, rows = 10) {
  const panel = page.locator(`[data-panel="${panelName}"]`);
  await panel.locator('button[data-act="run"]').click({ timeout: LIMIT });
  await page.waitForFunction(
    ([name, n]) => {
      const p = document.querySelector(`[data-panel="${name}"]`);
      const m = /(\d+) rows/.exec(p.querySelector(".status").textContent);
      return m && Number(m[1]) >= n && p.querySelectorAll("tbody tr").length > 0;
    },
    [panelName, rows],
    { timeout: LIMIT, polling: 100 },
  );
  return panel;
}

/** The ids of the endings the admin page shows now. */
const adminEndings = (admin) => admin.$$eval("#recent tbody tr[data-id]", (rows) => rows.map((r) => r.dataset.id));

/**
 * The admin page's newest recent ending of `want.kind` (default: any) with
 * `want.outcome` whose client-sent and backend-got cells start with the codes wanted
 * (null: any), leaving out the ids in `want.except`; fails if none shows up in time.
 */
async function adminEnding(admin, what, want) {
  const handle = await admin.waitForFunction(
    (w) => {
      for (const tr of document.querySelectorAll("#recent tbody tr[data-id]")) {
        if ((w.except || []).includes(tr.dataset.id)) continue;
        if (w.kind && tr.dataset.kind !== w.kind) continue;
        const cell = (c) => (tr.querySelector("." + c)?.textContent || "").trim();
        const codeIs = (c, v) => v == null || new RegExp("^" + v + "\\b").test(cell(c));
        if (tr.dataset.outcome === w.outcome && codeIs("client-sent", w.clientSent) && codeIs("backend-got", w.backendGot)) {
          return {
            id: tr.dataset.id, sent: cell("client-sent"), got: cell("backend-got"), release: cell("release"),
            http: cell("http-detail"), duration: cell("duration"),
          };
        }
      }
      return null;
    },
    want,
    { timeout: ADMIN_LIMIT, polling: 200 },
  ).catch((e) => {
    if (e.name === "TimeoutError") fail(`the admin page showed no ${what} within ${ADMIN_LIMIT / 1000} s`);
    throw e;
  });
  return handle.jsonValue();
}

async function main() {
  if (!DEMO || !ADMIN) fail("set WSGATE_DEMO_URL and WSGATE_ADMIN_URL");
  console.log(`demo: ${DEMO}\nadmin: ${ADMIN}`);
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    timeout: LIMIT,
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  try {
    const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
    watchContext(context);
    context.setDefaultTimeout(LIMIT);

    // (1) Run a query on one panel, then Cancel it: ws.close(1000, "cancelled").
    const first = Math.max(0, ...(await events()).map((e) => e.seq));
    const demo = await context.newPage();
    await demo.goto(DEMO, { waitUntil: "load" });
    const errors = await runQuery(demo, "errors");
    await errors.locator('button[data-act="cancel"]').click();
    await demo.waitForFunction(
      () => /cancelled after/.test(document.querySelector('[data-panel="errors"] .status').textContent),
      null, { timeout: LIMIT, polling: 100 },
    );
    say(`1. panel "errors": ${await errors.locator(".status").textContent()}`);
    const cancelled = await poll("the backend to record the Cancel", async () =>
      (await events()).find((e) => e.seq > first && e.panel === "errors" && e.kind === "client_close" && e.code === 1000));
    say(`   the backend saw: ${cancelled.text}`);

    // (2) The admin page shows that ending: client sent 1000, backend got 1000.
    const admin = await context.newPage();
    await admin.goto(ADMIN, { waitUntil: "load" });
    const ending = await adminEnding(admin, "client_close ending with client code 1000 and backend code 1000",
      { outcome: "client_close", clientSent: 1000, backendGot: 1000 });
    say(`2. admin page: ending #${ending.id} client_close, client sent ${ending.sent}, backend got ${ending.got}, release ${ending.release}`);
    if (await admin.locator("#error").isVisible()) fail(`the admin page shows an error: ${await admin.locator("#error").textContent()}`);

    // (3) Another query in a second tab, then close the tab: the browser sends Close 1001.
    const before = Math.max(0, ...(await events()).map((e) => e.seq));
    const tab = await context.newPage();
    await tab.goto(DEMO, { waitUntil: "load" });
    await runQuery(tab, "latency");
    const started = await poll("the backend to record the second tab's query", async () =>
      (await events()).find((e) => e.panel === "latency" && e.kind === "started" && e.seq > before));
    const query = started.query;
    const earlier = await adminEndings(admin);
    const status = await tab.locator('[data-panel="latency"] .status').textContent();
    await tab.close({ runBeforeUnload: false });
    say(`3. second tab, panel "latency": query #${query} (${status}); tab closed`);

    // (4) The backend got Close 1001 for that query, through wsgate; the admin page too.
    const gone = await poll(`the backend to record Close 1001 for query #${query}`, async () => {
      const e = (await events()).find((e) => e.query === query && e.kind !== "started");
      if (e && e.code !== 1001) fail(`query #${query} ended otherwise than with Close 1001: ${JSON.stringify(e)}`);
      return e;
    });
    say(`4. the backend saw: ${gone.text} (kind ${gone.kind})`);
    const tabEnding = await adminEnding(admin, "client_close ending with client code 1001",
      { outcome: "client_close", clientSent: 1001, except: earlier });
    say(`   admin page: ending #${tabEnding.id} client_close, client sent ${tabEnding.sent}, backend got ${tabEnding.got}, release ${tabEnding.release}`);
    if (await admin.locator("#error").isVisible()) fail(`the admin page shows an error: ${await admin.locator("#error").textContent()}`);

    // (5) A search in the SSE panel, the way OpenObserve queries: fetch of
    // POST /api/default/_search_stream, a text/event-stream read with a ReadableStream
    // reader. The admin page lists it with the open exchanges while it streams.
    const beforeSearch = Math.max(0, ...(await events()).map((e) => e.seq));
    const search = demo.locator('[data-panel="search"]');
    await search.locator('button[data-act="run"]').click();
    await demo.waitForFunction(
      () => {
        const m = /(\d+) hits/.exec(document.querySelector('[data-panel="search"] .status').textContent);
        return m && Number(m[1]) >= 50 && document.querySelectorAll('[data-panel="search"] tbody tr').length > 0;
      },
      null, { timeout: LIMIT, polling: 100 },
    );
    const streaming = await search.locator(".status").textContent();
    const open = await admin.waitForFunction(
      () => {
        for (const tr of document.querySelectorAll('#open tbody tr[data-kind="http"]')) {
          if (tr.querySelector(".who")?.textContent.includes("POST /api/default/_search_stream")) {
            return { id: tr.dataset.id, response: tr.querySelector(".response")?.textContent.trim(), sent: tr.querySelector(".b2c")?.firstChild?.textContent.trim() };
          }
        }
        return null;
      },
      null, { timeout: ADMIN_LIMIT, polling: 200 },
    ).catch((e) => {
      if (e.name === "TimeoutError") fail(`the admin page did not list the open search stream within ${ADMIN_LIMIT / 1000} s`);
      throw e;
    }).then((h) => h.jsonValue());
    say(`5. panel "search" (SSE): ${streaming}; the admin page lists it open: #${open.id} HTTP POST /api/default/_search_stream, ${open.response}, backend → client ${open.sent}`);

    // (6) Cancel: AbortController.abort(). The browser closes the connection; wsgate
    // closes the backend's at once, and the backend learns the stream is gone.
    const endedBefore = await adminEndings(admin);
    // Clicked from inside the page, so that the moment is the page's click, not the
    // driver's round trips before it.
    const cancelAt = await demo.evaluate(() => {
      const at = Date.now();
      document.querySelector('[data-panel="search"] button[data-act="cancel"]').click();
      return at;
    });
    await demo.waitForFunction(
      () => /cancelled after/.test(document.querySelector('[data-panel="search"] .status').textContent),
      null, { timeout: LIMIT, polling: 100 },
    );
    say(`6. panel "search": ${await search.locator(".status").textContent()}`);
    const searchEnd = await poll("the backend to record how the search stream ended", async () =>
      (await events()).find((e) => e.seq > beforeSearch && e.panel === "search" && e.kind !== "started"));
    if (searchEnd.kind !== "client_went_away") fail(`the search stream ended otherwise than by the client going away: ${JSON.stringify(searchEnd)}`);
    const lag = searchEnd.unix_ms - cancelAt;
    if (lag > 1_500 || !(searchEnd.since_last_event_ms < 1_000)) {
      fail(`the backend learned of the cancel late: ${lag} ms after the click, ${searchEnd.since_last_event_ms} ms after its last event`);
    }
    say(`   the backend saw: ${searchEnd.text} (${lag} ms after the click)`);

    // (7) The admin page: an HTTP ending, client_aborted, with its release time.
    const aborted = await adminEnding(admin, "HTTP ending with outcome client_aborted",
      { kind: "http", outcome: "client_aborted", except: endedBefore });
    if (aborted.id !== open.id) fail(`the client_aborted ending is #${aborted.id}, the stream was #${open.id}`);
    if (!/^\d[\d.]* (µs|ms|s)$/.test(aborted.release)) fail(`the HTTP ending shows no release time: "${aborted.release}"`);
    const chip = (await admin.locator('#http-totals .chip[data-outcome="client_aborted"] b').textContent()).trim();
    if (!(Number(chip) >= 1)) fail(`the summary counts ${chip} client_aborted HTTP endings`);
    say(`7. admin page: ending #${aborted.id} HTTP client_aborted (${aborted.http}), duration ${aborted.duration}, release ${aborted.release}; summary chip client_aborted ${chip}`);
    if (await admin.locator("#error").isVisible()) fail(`the admin page shows an error: ${await admin.locator("#error").textContent()}`);
  } finally {
    // What pages report while they are torn down is not the product's doing.
    recording = false;
    await browser.close().catch(() => {});
  }
}

let code = 0;
try {
  await main();
} catch (e) {
  console.log(`FAILED: ${e.message}`);
  code = 1;
}
const found = problems.slice(0, 20);
if (found.length) {
  console.log(`FAILED: ${problems.length} problem(s) in the browser:`);
  for (const p of found) console.log("  " + p);
  code = 1;
}
console.log(`${requests.count} requests and WebSockets, hosts: ${[...requests.hosts].join(", ") || "none"}`);
console.log(code === 0 ? "PASS: demo page and admin page behave" : "FAIL");
process.exit(code);
