// Browser tests of the dashboard page and /v1/client.js in Debian's headless
// Chromium, driven by playwright-core. Started by tests/browser.rs, which
// owns the hookstream server and passes, in the environment:
//
//   SCENARIO        live | resume | polling | cross-origin | sign-out
//   HS_URL          the public listener, http://127.0.0.1:PORT
//   HS_ADMIN_URL    the admin listener
//   HS_ADMIN_TOKEN  its bearer token
//   HS_KEY, HS_ORG  an API key and its org
//   HS_SAMPLES      assets/samples (realistic messages for the screenshot)
//   HS_SCREENSHOTS  where to write screenshots (dashboard.png and failures)
//   CHROMIUM        the browser (default /usr/bin/chromium)
//
// The server is restarted by the Rust side on request: this script prints
// `CONTROL <command>` and reads one line `OK <json>` from stdin.
//
// Prints `PASS <scenario> <facts>` and exits 0, or prints `FAIL <reason>`
// (and saves a screenshot of the page) and exits 1.

import { chromium } from "playwright-core";
import { readFileSync, mkdirSync } from "node:fs";
import { createServer, connect as tcpConnect } from "node:net";
import { createServer as createHttpServer } from "node:http";
import { createInterface } from "node:readline";
import { join } from "node:path";

const env = process.env;
const SCENARIO = env.SCENARIO;
let hsUrl = env.HS_URL;
let adminUrl = env.HS_ADMIN_URL;
let adminToken = env.HS_ADMIN_TOKEN;
const ORG = env.HS_ORG;
const KEY = env.HS_KEY;
const SHOTS = env.HS_SCREENSHOTS || "/tmp";

/** The launch flags this machine needs (no network beyond loopback). */
const CHROMIUM_ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];
// A server on TLS with a certificate made by the test (HS_URL https://…).
if (env.HS_IGNORE_CERTIFICATE_ERRORS === "1") CHROMIUM_ARGS.push("--ignore-certificate-errors");

// --- Small helpers ----------------------------------------------------------------

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const started = Date.now();
function log(...parts) {
  console.log(`[${((Date.now() - started) / 1000).toFixed(1)}s]`, ...parts);
}

class Failure extends Error {}
function check(condition, message) {
  if (!condition) throw new Failure(message);
}

/** Polls `probe` every 50 ms until it returns a truthy value. */
async function until(probe, timeoutMs, what) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await probe();
    if (value) return value;
    if (Date.now() > deadline) throw new Failure(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(50);
  }
}

// The Rust side's answers to CONTROL lines, in order.
const stdinLines = createInterface({ input: process.stdin });
const answers = [];
const waiters = [];
stdinLines.on("line", (line) => {
  if (waiters.length > 0) waiters.shift()(line);
  else answers.push(line);
});
async function control(command) {
  console.log(`CONTROL ${command}`);
  const line = answers.length > 0 ? answers.shift() : await new Promise((resolve) => waiters.push(resolve));
  check(line.startsWith("OK"), `CONTROL ${command} answered ${line}`);
  const rest = line.slice(2).trim();
  return rest ? JSON.parse(rest) : {};
}

/** POST /v1/publish on the admin listener; returns the seqs. */
async function publish(messages, admin = { url: adminUrl, token: adminToken }) {
  const response = await fetch(`${admin.url}/v1/publish`, {
    method: "POST",
    headers: { Authorization: `Bearer ${admin.token}`, "Content-Type": "application/json" },
    body: JSON.stringify(messages),
  });
  const text = await response.text();
  check(response.status === 202, `publish answered ${response.status}: ${text}`);
  return JSON.parse(text).seqs;
}

const sample = (name) => JSON.parse(readFileSync(join(env.HS_SAMPLES, `${name}.json`), "utf8"));
const event = (id, sourceId = "src_1", extra = {}) => ({
  org_id: ORG,
  type: "event",
  data: { id, source_id: sourceId, ...extra },
});

// --- The page ---------------------------------------------------------------------

let browser;
let page;

async function openPage(url) {
  const context = await browser.newContext({ viewport: { width: 1200, height: 860 } });
  const opened = await context.newPage();
  opened.on("pageerror", (error) => log("page error:", error.message));
  opened.on("console", (message) => {
    if (message.type() === "error" || message.type() === "warning") log(`console ${message.type()}:`, message.text());
  });
  await opened.goto(url);
  return opened;
}

async function signIn(target, key = KEY) {
  await target.waitForSelector("#sign-in-panel:not([hidden])", { timeout: 10000 });
  await target.fill("#key", key);
  await target.click("#sign-in button[type=submit]");
  await target.waitForSelector("#live-panel:not([hidden])", { timeout: 10000 });
  // Dropped duplicates are fine (that is the de-duplication working), but
  // worth seeing in the transcript.
  await target.evaluate(() =>
    window.hookstreamDashboard.stream.on("duplicate", ({ message, via, mark }) =>
      console.warn(`duplicate dropped: seq ${message.seq} on ${message.channel} via ${via}, mark ${mark}`),
    ),
  );
}

const stateOf = (target) => target.textContent("#state");
const stats = (target) => target.evaluate(() => window.hookstreamDashboard.stream?.stats ?? null);

/** How many message rows show `id` (in their JSON), per channel. */
async function rowsWithId(target, id) {
  return target.evaluate((id) => {
    const counts = {};
    for (const row of document.querySelectorAll("#messages li")) {
      if (row.querySelector("pre").textContent.includes(`"${id}"`)) {
        counts[row.dataset.channel] = (counts[row.dataset.channel] || 0) + 1;
      }
    }
    return counts;
  }, id);
}

async function waitForRow(target, id, channel, timeoutMs) {
  await until(async () => (await rowsWithId(target, id))[channel] >= 1, timeoutMs, `${id} on ${channel}`);
}

async function waitForState(target, state, timeoutMs) {
  await until(async () => (await stateOf(target)) === state, timeoutMs, `state ${state}`);
}

// --- Scenarios ----------------------------------------------------------------------

/** Sign in, subscribe, publish through the admin API, see it; screenshot; sign out. */
async function live() {
  page = await openPage(`${hsUrl}/`);
  await signIn(page);
  await waitForState(page, "open", 10000);
  check((await page.textContent("#org")) === ORG, "the page names the org");
  // A channel of one source, added through the form.
  await page.selectOption("#channel-kind", "events");
  await page.fill("#channel-id", "src_1");
  await page.click("#add-channel button[type=submit]");
  await page.waitForSelector('#extra-channels li[data-channel="events:src_1"]');
  // No wait for the acknowledgement: the subscription carries `after` = the
  // newest seq the page knew, so a message published before the server
  // handled it is replayed.
  const publishedAt = Date.now();
  const [seq] = await publish([event("evt_live_1", "src_1", { note: "published by the browser test" })]);
  await waitForRow(page, "evt_live_1", "events", 5000);
  await waitForRow(page, "evt_live_1", "events:src_1", 5000);
  const latencyMs = Date.now() - publishedAt;
  const rows = await rowsWithId(page, "evt_live_1");
  check(rows.events === 1 && rows["events:src_1"] === 1, `evt_live_1 shown once per channel: ${JSON.stringify(rows)}`);
  const seqShown = await page.getAttribute('#messages li[data-channel="events"]', "data-seq");
  check(Number(seqShown) === seq, `seq on the page ${seqShown} = published ${seq}`);

  // A few realistic messages for the screenshot, and the counters.
  const delivery = sample("delivery");
  const issue = sample("issue");
  const evt = sample("event");
  await publish([
    { org_id: ORG, type: "event", data: { ...evt, org_id: ORG } },
    { org_id: ORG, type: "delivery", data: { ...delivery, org_id: ORG } },
    { org_id: ORG, type: "issue", data: { ...issue, org_id: ORG } },
  ]);
  await waitForRow(page, issue.id, "issues", 5000);
  await waitForRow(page, delivery.id, "deliveries", 5000);
  check((await page.textContent("#count-delivery")) === "1", "delivery counter is 1");
  check((await page.textContent("#count-issue")) === "1", "issue counter is 1");
  check((await page.textContent("#count-event")) === "3", "event counter is 3 (one on two channels, one sample)");
  mkdirSync(SHOTS, { recursive: true });
  await page.screenshot({ path: join(SHOTS, "dashboard.png") });

  // Every digit survives to the page (JSON.parse alone would round these).
  const digits = ["123456789012345678901234567890", "0.1000000000000000000001"];
  const exact = await fetch(`${adminUrl}/v1/publish`, {
    method: "POST",
    headers: { Authorization: `Bearer ${adminToken}`, "Content-Type": "application/json" },
    body: `{"org_id":"${ORG}","type":"event","data":{"id":"evt_digits","source_id":"src_9","amount":${digits[0]},"ratio":${digits[1]}}}`,
  });
  check(exact.status === 202, `publish of exact digits answered ${exact.status}`);
  await waitForRow(page, "evt_digits", "events", 5000);
  const shown = await page.evaluate(() => document.querySelector('#messages li[data-channel="events"] pre').textContent);
  check(
    shown.includes(`"amount": ${digits[0]}`) && shown.includes(`"ratio": ${digits[1]}`),
    `every digit on the page: ${shown}`,
  );

  // Unsubscribing stops a channel.
  await page.uncheck('.fixed-channel[value="issues"]');
  await page.evaluate(() => new Promise((resolve) => setTimeout(resolve, 300)));
  await publish([{ org_id: ORG, type: "issue", data: { id: "iss_after_unsubscribe" } }, event("evt_marker", "src_2")]);
  await waitForRow(page, "evt_marker", "events", 5000);
  const after = await rowsWithId(page, "iss_after_unsubscribe");
  check(Object.keys(after).length === 0, `no issue after unsubscribing: ${JSON.stringify(after)}`);

  // Sign out: back to the form, and the cookie no longer works.
  await page.click("#sign-out");
  await page.waitForSelector("#sign-in-panel:not([hidden])", { timeout: 5000 });
  const status = await page.evaluate(async () => (await fetch("/v1/sessions")).status);
  check(status === 401, `GET /v1/sessions after sign-out answers ${status}`);
  return `seq=${seq} latency_ms=${latencyMs}`;
}

/**
 * The server goes away and comes back on the same port and data directory.
 * Meanwhile a second run of the server on another port (same data dir)
 * takes two messages the page cannot see; the page must reconnect by
 * itself within its backoff schedule and show them once each (resume by
 * seq), then the live one.
 */
async function resume() {
  page = await openPage(`${hsUrl}/`);
  await signIn(page);
  await waitForState(page, "open", 10000);
  await publish([event("evt_before", "src_1")]);
  await waitForRow(page, "evt_before", "events", 5000);

  await control("stop");
  const stoppedAt = Date.now();
  await until(async () => (await stateOf(page)) !== "open", 5000, "the page to notice the server is gone");
  // The clear message: the banner says the server cannot be reached.
  const banner = await until(async () => {
    const text = await page.textContent("#banner");
    const hidden = await page.getAttribute("#banner", "hidden");
    return hidden === null && text.includes("Cannot reach") ? text : null;
  }, 10000, "the unreachable banner");
  log("banner:", banner);

  // Messages published while the page's server is away.
  const aside = await control("start-aside");
  const missed = await publish([event("evt_missed_1", "src_1"), event("evt_missed_2", "src_2")], aside);
  await control("stop-aside");
  // Stay down through two failed attempts, so the delays have grown
  // (≤ 1 s, ≤ 2 s, then ≤ 4 s pending) before the server comes back.
  await until(async () => (await stats(page)).backoffMs.length >= 3, 10000, "two failed reconnect attempts");
  // The restarted server listens on the same public port; its admin
  // listener is on a new one.
  const restarted = await control("start");
  const upAt = Date.now();
  adminUrl = restarted.url;
  adminToken = restarted.token;
  await waitForState(page, "open", 32000);
  const reconnectMs = Date.now() - upAt;
  const downMs = upAt - stoppedAt;
  await waitForRow(page, "evt_missed_1", "events", 5000);
  await waitForRow(page, "evt_missed_2", "events", 5000);
  const [liveSeq] = await publish([event("evt_after", "src_1")]);
  await waitForRow(page, "evt_after", "events", 5000);
  // Time for any late duplicate (a poll racing the replay) to show up.
  await sleep(1500);
  for (const id of ["evt_before", "evt_missed_1", "evt_missed_2", "evt_after"]) {
    const rows = await rowsWithId(page, id);
    check(rows.events === 1, `${id} shown exactly once on events: ${JSON.stringify(rows)}`);
  }
  const shownSeqs = await page.evaluate(() =>
    [...document.querySelectorAll('#messages li[data-channel="events"]')].map((row) => Number(row.dataset.seq)),
  );
  check(
    JSON.stringify(shownSeqs) === JSON.stringify([...shownSeqs].sort((a, b) => b - a)),
    `messages newest first, each seq once: ${shownSeqs}`,
  );
  check(shownSeqs.includes(missed[0]) && shownSeqs.includes(missed[1]) && shownSeqs.includes(liveSeq), "missed and live seqs shown");

  // The backoff schedule: delay n in [step/2, step] with step = min(30 s, 1 s · 2^n).
  const s = await stats(page);
  const delays = s.backoffMs;
  check(delays.length >= 1, "at least one reconnect delay was chosen");
  delays.forEach((delay, n) => {
    const step = Math.min(30000, 1000 * 2 ** n);
    check(delay >= step / 2 && delay <= step, `delay ${n} = ${delay} ms within [${step / 2}, ${step}]`);
  });
  // Back within the pending delay (the longest chosen) plus the handshake.
  const pending = Math.max(...delays);
  check(reconnectMs <= pending + 2000, `reconnected ${reconnectMs} ms after the restart, pending delay ${pending} ms`);
  check(s.connects === 2, `two welcomes (first connect and the reconnect): ${s.connects}`);
  return `down_ms=${downMs} reconnect_after_restart_ms=${reconnectMs} backoff_ms=${delays.join(",")} via_socket=${s.viaSocket} via_poll=${s.viaPoll} duplicates_dropped=${s.duplicates}`;
}

/**
 * A proxy in front of the server that passes plain HTTP but refuses every
 * WebSocket upgrade (as some corporate proxies do). The page, loaded
 * through it, must fall back to polling and still show new messages within
 * 5 s.
 */
async function polling() {
  const [host, port] = new URL(hsUrl).host.split(":");
  let refused = 0;
  const proxy = createServer((client) => {
    const upstream = tcpConnect(Number(port), host);
    client.on("error", () => upstream.destroy());
    upstream.on("error", () => client.destroy());
    client.on("data", (chunk) => {
      // A WebSocket upgrade is refused; anything else is passed on.
      if (/\r\nupgrade:\s*websocket/i.test(chunk.toString("latin1"))) {
        refused += 1;
        client.end("HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        upstream.destroy();
        return;
      }
      upstream.write(chunk);
    });
    upstream.on("data", (chunk) => client.write(chunk));
    upstream.on("end", () => client.end());
    client.on("end", () => upstream.end());
  });
  await new Promise((resolve) => proxy.listen(0, "127.0.0.1", resolve));
  const proxyUrl = `http://127.0.0.1:${proxy.address().port}`;
  try {
    page = await openPage(`${proxyUrl}/`);
    await signIn(page);
    // The first socket fails; the fallback poll runs at once and sets the
    // starting point (the banner says polling has taken over).
    await until(async () => (await stats(page))?.polls >= 1, 10000, "the first poll");
    check(refused >= 1, "the proxy refused an upgrade");
    const latencies = [];
    // Publish at different points of the 5 s poll cycle.
    for (const [i, pauseMs] of [0, 1700, 3400].entries()) {
      await sleep(pauseMs);
      const id = `evt_polled_${i}`;
      const publishedAt = Date.now();
      await publish([event(id, "src_1")]);
      await waitForRow(page, id, "events", 5000);
      latencies.push(Date.now() - publishedAt);
    }
    for (const i of [0, 1, 2]) {
      const rows = await rowsWithId(page, `evt_polled_${i}`);
      check(rows.events === 1, `evt_polled_${i} shown once: ${JSON.stringify(rows)}`);
    }
    const s = await stats(page);
    check(s.connects === 0 && s.viaSocket === 0, `no WebSocket ever opened: ${JSON.stringify(s)}`);
    check(s.viaPoll >= 3, `messages came by polling: ${s.viaPoll}`);
    const state = await stateOf(page);
    check(state === "polling" || state === "connecting", `state is ${state}`);
    return `latencies_ms=${latencies.join(",")} refused_upgrades=${refused} polls=${s.polls}`;
  } finally {
    proxy.close();
  }
}

/**
 * A page from another origin (another port of the same host: same site, so
 * the browser does attach the SameSite=Lax cookie) must not get a
 * cookie-authenticated socket: the server refuses the upgrade with 403 by
 * its Origin rule. The same socket from the dashboard's own origin opens.
 */
async function crossOrigin() {
  const wsUrl = `${hsUrl.replace(/^http/, "ws")}/v1/ws`;
  const otherPage = `<!doctype html><meta charset="utf-8"><title>other site</title>
<script type="module">
  window.results = { raw: "pending", states: [] };
  const socket = new WebSocket(${JSON.stringify(wsUrl)});
  socket.onopen = () => { window.results.raw = "open"; };
  socket.onclose = (event) => { if (window.results.raw === "pending") window.results.raw = "closed " + event.code; };
  // The module itself may be loaded from the gateway by any origin (CORS).
  const { connect } = await import(${JSON.stringify(`${hsUrl}/v1/client.js`)});
  const stream = connect({ url: ${JSON.stringify(hsUrl)} });
  stream.on("state", (state) => window.results.states.push(state));
  stream.subscribe("events");
  // With an API key instead of the cookie, another origin is fine: the
  // Origin rule guards only the credential a browser attaches by itself.
  window.results.tokenStates = [];
  const withKey = connect({ url: ${JSON.stringify(hsUrl)}, token: ${JSON.stringify(KEY)} });
  withKey.on("state", (state) => window.results.tokenStates.push(state));
</script>`;
  const other = createHttpServer((request, response) => {
    response.writeHead(200, { "Content-Type": "text/html" });
    response.end(otherPage);
  });
  await new Promise((resolve) => other.listen(0, "127.0.0.1", resolve));
  const otherUrl = `http://127.0.0.1:${other.address().port}/`;
  try {
    // Signed in on the dashboard's origin, whose own socket opens.
    page = await openPage(`${hsUrl}/`);
    await signIn(page);
    await waitForState(page, "open", 10000);
    const sameOrigin = await page.evaluate(
      (url) =>
        new Promise((resolve) => {
          const socket = new WebSocket(url);
          socket.onopen = () => {
            socket.close();
            resolve("open");
          };
          socket.onclose = (event) => resolve(`closed ${event.code}`);
        }),
      wsUrl,
    );
    check(sameOrigin === "open", `same-origin cookie socket: ${sameOrigin}`);

    // The other origin, in the same browser context (so with the cookie).
    const attacker = await page.context().newPage();
    const handshakeErrors = [];
    attacker.on("websocket", (socket) => {
      socket.on("socketerror", (error) => handshakeErrors.push(String(error)));
    });
    await attacker.goto(otherUrl);
    await until(async () => (await attacker.evaluate(() => window.results.raw)) !== "pending", 10000, "the raw socket to settle");
    // Let the client module make its first attempt and a retry too.
    await until(
      async () => (await attacker.evaluate(() => window.results.states)).filter((s) => s === "connecting").length >= 2,
      10000,
      "two connection attempts from the other origin",
    );
    const results = await attacker.evaluate(() => window.results);
    check(results.raw.startsWith("closed"), `cross-origin socket did not open: ${results.raw}`);
    check(!results.states.includes("open"), `the client never reached open: ${results.states}`);
    check(results.tokenStates.includes("open"), `with a key the other origin connects: ${results.tokenStates}`);
    await until(async () => handshakeErrors.length >= 1, 5000, "the handshake error of the refused socket");
    check(
      handshakeErrors.every((error) => error.includes("403")),
      `refused with 403 (the Origin rule), not 401: ${JSON.stringify(handshakeErrors)}`,
    );
    return `raw=${results.raw.replace(/ /g, "_")} states=${results.states.join(">")} errors=${JSON.stringify(handshakeErrors[0])}`;
  } finally {
    other.close();
  }
}

/**
 * Two browsers (their own cookie jars) sign in with one key; the first
 * signs out. Its second tab, whose socket the server closes with 4003
 * "signed out", says it was signed out; the other browser stays signed in
 * and live. Then the key is revoked: that browser says the key was revoked.
 */
async function signOut() {
  const first = await openPage(`${hsUrl}/`);
  const other = await openPage(`${hsUrl}/`);
  page = other;
  await Promise.all([signIn(first), signIn(other)]);
  await waitForState(first, "open", 10000);
  await waitForState(other, "open", 10000);
  // A second tab of the first browser: same cookie, signed in already.
  const firstTab = await first.context().newPage();
  firstTab.on("console", (message) => {
    if (message.type() === "error") log("console error (tab):", message.text());
  });
  await firstTab.goto(`${hsUrl}/`);
  await firstTab.waitForSelector("#live-panel:not([hidden])", { timeout: 10000 });
  await waitForState(firstTab, "open", 10000);

  await first.click("#sign-out");
  await first.waitForSelector("#sign-in-panel:not([hidden])", { timeout: 5000 });
  await firstTab.waitForSelector("#sign-in-panel:not([hidden])", { timeout: 5000 });
  const tabNote = await firstTab.textContent("#sign-in-error");
  check(/signed out/i.test(tabNote) && !/revoked/i.test(tabNote), `the other tab says it was signed out: ${tabNote}`);

  // The other browser's session is its own: still signed in, still live.
  const status = await other.evaluate(async () => (await fetch("/v1/sessions")).status);
  check(status === 200, `the other browser's GET /v1/sessions answers ${status}`);
  await publish([event("evt_after_sign_out", "src_1")]);
  await waitForRow(other, "evt_after_sign_out", "events", 5000);
  check((await stateOf(other)) === "open", "the other browser's socket stays open");

  await control("revoke");
  await other.waitForSelector("#sign-in-panel:not([hidden])", { timeout: 10000 });
  const otherNote = await other.textContent("#sign-in-error");
  check(/revoked/i.test(otherNote), `the other browser says the key was revoked: ${otherNote}`);
  return `tab="${tabNote.replace(/ /g, "_")}" other="${otherNote.replace(/ /g, "_")}"`;
}

// --- Main -----------------------------------------------------------------------------

const SCENARIOS = { live, resume, polling, "cross-origin": crossOrigin, "sign-out": signOut };

async function main() {
  const scenario = SCENARIOS[SCENARIO];
  if (!scenario) {
    console.log(`FAIL unknown SCENARIO ${JSON.stringify(SCENARIO)}; one of ${Object.keys(SCENARIOS).join(", ")}`);
    return 1;
  }
  browser = await chromium.launch({
    executablePath: env.CHROMIUM || "/usr/bin/chromium",
    args: CHROMIUM_ARGS,
    timeout: 20000,
  });
  log(`chromium ${browser.version()}, scenario ${SCENARIO}`);
  try {
    const facts = await scenario();
    console.log(`PASS ${SCENARIO} ${facts}`);
    return 0;
  } catch (error) {
    console.log(`FAIL ${SCENARIO}: ${error instanceof Failure ? error.message : error.stack}`);
    if (page) {
      try {
        mkdirSync(SHOTS, { recursive: true });
        const path = join(SHOTS, `failed-${SCENARIO}.png`);
        await page.screenshot({ path });
        console.log(`screenshot of the failure: ${path}`);
        const s = await stats(page).catch(() => null);
        console.log(`page state ${await stateOf(page).catch(() => "?")}, stats ${JSON.stringify(s)}`);
      } catch {
        // The page may be gone.
      }
    }
    return 1;
  } finally {
    await browser.close();
  }
}

const code = await main();
stdinLines.close();
process.exit(code);
