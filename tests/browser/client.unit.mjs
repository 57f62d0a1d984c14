// Unit tests of assets/web/client.js under Node.js, with a fake clock, a
// fake WebSocket and a fake fetch: the backoff schedule, de-duplication,
// resume marks, polling cadence and catch-up, and the edge cases a real
// browser test cannot reach quickly (a 30 s cap, truncated poll pages, a
// revoked key, expired history, a silent socket). Started by
// tests/browser.rs; prints `PASS client-unit <n> cases` or fails.

import assert from "node:assert/strict";
import { fileURLToPath } from "node:url";
import { dirname, join } from "node:path";

// --- A fake clock (installed before the module is loaded) -------------------

let now = 1_000_000;
let nextTimerId = 1;
const timers = new Map();
globalThis.setTimeout = (fn, ms = 0) => {
  const id = nextTimerId++;
  timers.set(id, { at: now + Math.max(0, ms), fn });
  return id;
};
globalThis.setInterval = (fn, ms) => {
  const id = nextTimerId++;
  timers.set(id, { at: now + ms, fn, every: ms });
  return id;
};
globalThis.clearTimeout = (id) => timers.delete(id);
globalThis.clearInterval = (id) => timers.delete(id);
Date.now = () => now;
let random = 0.5;
Math.random = () => random;

/** Lets promise chains (fetch answers, microtasks) run. */
async function settle() {
  for (let i = 0; i < 30; i += 1) await new Promise((resolve) => setImmediate(resolve));
}

/** Moves the clock forward by `ms`, firing due timers in order. */
async function advance(ms) {
  const end = now + ms;
  await settle();
  for (;;) {
    let due = null;
    for (const [id, timer] of timers) {
      if (timer.at <= end && (due === null || timer.at < due[1].at)) due = [id, timer];
    }
    if (due === null) break;
    const [id, timer] = due;
    now = Math.max(now, timer.at);
    if (timer.every) timer.at += timer.every;
    else timers.delete(id);
    timer.fn();
    await settle();
  }
  now = end;
  await settle();
}

// --- A fake WebSocket and fetch ---------------------------------------------------

globalThis.location = { origin: "http://gw.test", href: "http://gw.test/dash" };

let sockets = [];
class FakeWebSocket {
  constructor(url) {
    this.url = url;
    this.sent = [];
    this.closedWith = null;
    sockets.push(this);
  }
  send(text) {
    this.sent.push(JSON.parse(text));
  }
  close(code) {
    this.closedWith = code ?? 1005;
  }
  /** The server sends a message (an object, or exact text). */
  deliver(message) {
    this.onmessage?.({ data: typeof message === "string" ? message : JSON.stringify(message) });
  }
  /** The connection ends (or never opened). */
  drop(code = 1006, reason = "") {
    this.onclose?.({ code, reason });
  }
}
globalThis.WebSocket = FakeWebSocket;

let requests = [];
/** Answers a poll: (URL, options) -> {status, body} or "network" (a failed fetch). */
let pollHandler = () => ({ status: 200, body: { org_id: "o", messages: [], next_after: 0 } });
globalThis.fetch = async (url, options = {}) => {
  const parsed = new URL(url);
  const request = {
    url: parsed,
    channels: parsed.searchParams.get("channels"),
    after: Number(parsed.searchParams.get("after")),
    waitMs: Number(parsed.searchParams.get("wait_ms") || 0),
    headers: options.headers || {},
    at: now,
  };
  requests.push(request);
  const answer = pollHandler(request);
  if (answer === "network") throw new TypeError("Failed to fetch");
  return {
    status: answer.status,
    ok: answer.status >= 200 && answer.status < 300,
    text: async () => answer.text ?? JSON.stringify(answer.body),
  };
};

const here = dirname(fileURLToPath(import.meta.url));
const client = await import(join(here, "../../assets/web/client.js"));
const { connect, backoffStepMs } = client;

// --- Helpers --------------------------------------------------------------------------

function reset() {
  for (const id of [...timers.keys()]) timers.delete(id);
  sockets = [];
  requests = [];
  random = 0.5;
  pollHandler = () => ({ status: 200, body: { org_id: "o", messages: [], next_after: 0 } });
}

/** A stream with listeners recording everything. */
async function open(options = {}, channels = ["events"]) {
  const stream = connect(options);
  const seen = { states: [], messages: [], errors: [] };
  stream.on("state", (state) => seen.states.push(state));
  stream.on("message", (message) => seen.messages.push(message));
  stream.on("error", (error) => seen.errors.push(error));
  for (const channel of channels) stream.subscribe(channel);
  await settle();
  return { stream, seen };
}

const event = (seq, channel = "events") => ({ type: "event", channel, seq, data: { id: `evt_${seq}` } });
const welcome = (seq, heartbeat_ms = 30000) => ({ type: "welcome", org_id: "o", connection_id: "c", seq, heartbeat_ms });
const lastSocket = () => sockets[sockets.length - 1];
const subscribes = (socket) => socket.sent.filter((m) => m.type === "subscribe");

const cases = [];
function test(name, body) {
  cases.push([name, body]);
}

// --- Cases ------------------------------------------------------------------------------

test("backoff steps: 1 s, 2 s, 4 s … capped at 30 s", () => {
  assert.deepEqual(
    [0, 1, 2, 3, 4, 5, 6, 10, 100].map(backoffStepMs),
    [1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000, 30000],
  );
});

test("welcome, subscribe with after, each seq once", async () => {
  const { stream, seen } = await open();
  assert.equal(seen.states[0], "connecting");
  const socket = lastSocket();
  assert.equal(socket.url, "ws://gw.test/v1/ws");
  assert.deepEqual(subscribes(socket), []); // no mark until the welcome
  socket.deliver(welcome(41));
  assert.equal(stream.state, "open");
  assert.deepEqual(subscribes(socket), [{ type: "subscribe", channel: "events", after: 41 }]);
  socket.deliver(event(42));
  socket.deliver(event(42));
  socket.deliver(event(40)); // older than the mark
  socket.deliver(event(43));
  assert.deepEqual(seen.messages.map((m) => m.seq), [42, 43]);
  assert.equal(stream.stats.duplicates, 2);
  // A subscription made while open starts at the newest seq known.
  stream.subscribe("issues");
  assert.deepEqual(subscribes(socket).at(-1), { type: "subscribe", channel: "issues", after: 43 });
  stream.unsubscribe("issues");
  assert.deepEqual(socket.sent.at(-1), { type: "unsubscribe", channel: "issues" });
  socket.deliver({ type: "issue", channel: "issues", seq: 44, data: {} }); // in flight
  assert.equal(seen.messages.length, 2);
  stream.close();
  assert.equal(stream.state, "closed");
  assert.equal(socket.closedWith, 1000);
});

test("reconnect schedule with jitter, resubscribe with each channel's mark", async () => {
  random = 1 - 2 ** -40; // the top of the jitter range
  const { stream, seen } = await open({}, ["events", "deliveries"]);
  let socket = lastSocket();
  socket.deliver(welcome(10));
  socket.deliver(event(11));
  socket.deliver({ type: "delivery", channel: "deliveries", seq: 12, data: {} });
  socket.deliver(event(13));
  pollHandler = () => "network";
  socket.drop(1001);
  assert.equal(stream.state, "polling");
  // Every retry fails; delays follow the schedule (jitter near the top).
  const expected = [1000, 2000, 4000, 8000, 16000, 30000, 30000];
  for (const step of expected) {
    const before = sockets.length;
    await advance(step - 10);
    assert.equal(sockets.length, before, `no attempt before ${step} ms`);
    await advance(10);
    assert.equal(sockets.length, before + 1, `an attempt at ${step} ms`);
    assert.equal(stream.state, "connecting");
    lastSocket().drop();
  }
  // The first drop and each failed attempt chose a delay; the last is pending.
  assert.deepEqual(stream.stats.backoffMs, [...expected, 30000]);
  await advance(30000);
  // The bottom of the jitter range: half the step.
  random = 0;
  lastSocket().drop();
  assert.equal(stream.stats.backoffMs.at(-1), 15000);
  await advance(15000);
  socket = lastSocket();
  pollHandler = () => ({ status: 200, body: { org_id: "o", messages: [], next_after: 13 } });
  socket.deliver(welcome(20));
  assert.deepEqual(subscribes(socket), [
    { type: "subscribe", channel: "events", after: 13 },
    { type: "subscribe", channel: "deliveries", after: 12 },
  ]);
  // Replay and live: 14..16 once.
  for (const seq of [14, 15, 16]) socket.deliver(event(seq));
  assert.deepEqual(seen.messages.map((m) => m.seq), [11, 12, 13, 14, 15, 16]);
  stream.close();
});

test("a connection that lasted starts the schedule over; one that flaps does not", async () => {
  random = 1 - 2 ** -40; // the top of the jitter range
  const { stream } = await open();
  lastSocket().deliver(welcome(1));
  await advance(6000);
  lastSocket().drop();
  await advance(1000);
  lastSocket().deliver(welcome(1)); // open again, but only briefly
  await advance(100);
  lastSocket().drop();
  assert.deepEqual(stream.stats.backoffMs, [1000, 2000]);
  stream.close();
});

test("polls: at once after a drop, every 5 s down (long-poll), every 30 s up", async () => {
  const { stream, seen } = await open({}, ["events", "issues"]);
  const socket = lastSocket();
  socket.deliver(welcome(100));
  socket.deliver(event(101));
  await advance(29000);
  assert.equal(requests.length, 0);
  await advance(1000);
  assert.equal(requests.length, 1, "the safety poll at 30 s");
  assert.equal(requests[0].waitMs, 0);
  assert.equal(requests[0].after, 100); // the lower of the two marks
  assert.equal(requests[0].channels, "events,issues");
  // Down: a poll at once, with wait_ms; news is followed by the next poll at once.
  let answers = [
    { messages: [event(101), event(102), { type: "issue", channel: "issues", seq: 103, data: {} }], next_after: 103 },
    { messages: [], next_after: 103 },
  ];
  pollHandler = () => ({ status: 200, body: { org_id: "o", ...(answers.shift() || { messages: [], next_after: 103 }) } });
  random = 1 - 2 ** -40; // the top of the jitter range
  socket.drop();
  await advance(0);
  const afterDrop = requests.slice(1);
  assert.equal(afterDrop.length, 2, "catch-up poll, then the next at once after news");
  assert.equal(afterDrop[0].waitMs, 4000);
  assert.equal(afterDrop[0].after, 100);
  assert.equal(afterDrop[1].after, 103);
  assert.deepEqual(seen.messages.map((m) => m.seq), [101, 102, 103]);
  assert.equal(stream.stats.duplicates, 1);
  // Then every 5 s (reconnect attempts keep failing meanwhile).
  const count = requests.length;
  for (let i = 0; i < 4; i += 1) {
    await advance(5000);
    if (lastSocket() !== socket && lastSocket().onclose) lastSocket().drop();
  }
  assert.equal(requests.length, count + 4, "one poll per 5 s while down");
  stream.close();
  await advance(60000);
  assert.equal(requests.length, count + 4, "nothing after close");
});

test("a poll answer moves every polled channel's mark to next_after", async () => {
  const { stream, seen } = await open({}, ["events", "issues"]);
  const socket = lastSocket();
  socket.deliver(welcome(5));
  pollHandler = () => ({ status: 200, body: { org_id: "o", messages: [event(6)], next_after: 50 } });
  socket.drop();
  await advance(0);
  pollHandler = () => ({ status: 200, body: { org_id: "o", messages: [], next_after: 50 } });
  await advance(1000); // reconnect
  lastSocket().deliver(welcome(50));
  assert.deepEqual(subscribes(lastSocket()), [
    { type: "subscribe", channel: "events", after: 50 },
    { type: "subscribe", channel: "issues", after: 50 },
  ]);
  assert.deepEqual(seen.messages.map((m) => m.seq), [6]);
  stream.close();
});

test("never connected: the first poll asks for now (no after) and shows no history", async () => {
  const { stream, seen } = await open({ token: "hsk_abc" });
  assert.equal(lastSocket().url, "ws://gw.test/v1/ws?token=hsk_abc");
  pollHandler = (request) => {
    if (!request.url.searchParams.has("after")) {
      // The server answers a poll without after with its current seq.
      return { status: 200, body: { org_id: "o", messages: [], next_after: 1001 } };
    }
    if (requests.length === 2) {
      return { status: 200, body: { org_id: "o", messages: [event(request.after + 1)], next_after: request.after + 1 } };
    }
    return { status: 200, body: { org_id: "o", messages: [], next_after: request.after } };
  };
  lastSocket().drop(); // the first socket fails: poll at once
  await advance(0);
  assert.equal(requests[0].headers.Authorization, "Bearer hsk_abc");
  assert.equal(requests[0].url.searchParams.has("after"), false, "one poll without after finds now");
  // After the baseline, the normal poll hands over what is new.
  assert.equal(requests[1].after, 1001);
  assert.deepEqual(seen.messages.map((m) => m.seq).slice(0, 1), [1002]);
  stream.close();
});

test("a poll answer with recovered: false reports a history gap", async () => {
  const { stream, seen } = await open();
  lastSocket().deliver(welcome(10));
  pollHandler = (request) => ({
    status: 200,
    body: { org_id: "o", messages: [event(500)], next_after: 500, recovered: false },
  });
  lastSocket().drop();
  await advance(0);
  const gaps = seen.errors.filter((e) => e.code === "history_gap");
  assert.equal(gaps.length >= 1, true);
  assert.equal(gaps[0].channel, "events");
  assert.deepEqual(seen.messages.map((m) => m.seq), [500]);
  stream.close();
});

test("a truncated poll page is followed by the next page", async () => {
  const { stream, seen } = await open();
  lastSocket().deliver(welcome(0));
  let page = 0;
  pollHandler = (request) => {
    page += 1;
    if (page === 1) {
      return { status: 200, body: { org_id: "o", messages: Array.from({ length: 1000 }, (_, i) => event(request.after + i + 1)), next_after: request.after + 1000 } };
    }
    return { status: 200, body: { org_id: "o", messages: [event(request.after + 1)], next_after: request.after + 1 } };
  };
  await advance(30000);
  assert.deepEqual(requests.map((r) => r.after), [0, 1000]);
  assert.equal(seen.messages.length, 1001);
  assert.equal(seen.messages.at(-1).seq, 1001);
  stream.close();
});

test("a revoked key closes the stream for good", async () => {
  const { stream, seen } = await open();
  lastSocket().deliver(welcome(1));
  lastSocket().drop(4003);
  assert.equal(stream.state, "closed");
  assert.equal(seen.errors[0].code, "key_revoked");
  const count = sockets.length;
  await advance(120000);
  assert.equal(sockets.length, count);
});

test("a signed-out session closes the stream for good, and says it was a sign-out", async () => {
  const { stream, seen } = await open();
  lastSocket().deliver(welcome(1));
  lastSocket().drop(4003, "signed out");
  assert.equal(stream.state, "closed");
  assert.equal(seen.errors[0].code, "signed_out");
  const count = sockets.length;
  await advance(120000);
  assert.equal(sockets.length, count);
});

test("a 4003 with the revoked-key reason is a revoked key", async () => {
  const { stream, seen } = await open();
  lastSocket().deliver(welcome(1));
  lastSocket().drop(4003, "key revoked");
  assert.equal(stream.state, "closed");
  assert.equal(seen.errors[0].code, "key_revoked");
});

test("expired history: subscribe again without after, and say so", async () => {
  const { stream, seen } = await open();
  const socket = lastSocket();
  socket.deliver(welcome(1));
  socket.deliver({ type: "error", code: "history_unavailable", message: "gone", channel: "events" });
  assert.deepEqual(socket.sent.at(-1), { type: "subscribe", channel: "events" });
  assert.equal(seen.errors[0].code, "history_unavailable");
  stream.close();
});

test("a resume past retention is reported (subscribed, recovered: false)", async () => {
  const { stream, seen } = await open();
  const socket = lastSocket();
  socket.deliver(welcome(1));
  socket.deliver({ type: "subscribed", channel: "events", recovered: true });
  assert.equal(seen.errors.length, 0);
  socket.deliver({ type: "subscribed", channel: "events", recovered: false });
  assert.equal(seen.errors[0].code, "history_gap");
  assert.equal(seen.errors[0].channel, "events");
  stream.close();
});

test("unauthorized polls are reported", async () => {
  const { stream, seen } = await open();
  pollHandler = () => ({ status: 401, body: { error: "unauthorized" } });
  lastSocket().drop();
  await advance(0);
  assert.equal(seen.errors[0].code, "unauthorized");
  stream.close();
});

test("reachability comes from polls", async () => {
  const { stream } = await open();
  const changes = [];
  stream.on("reachable", (reachable) => changes.push(reachable));
  pollHandler = () => "network";
  lastSocket().drop();
  await advance(0);
  assert.equal(stream.reachable, false);
  pollHandler = () => ({ status: 200, body: { org_id: "o", messages: [], next_after: 0 } });
  await advance(5000);
  assert.equal(stream.reachable, true);
  assert.deepEqual(changes, [false, true]);
  stream.close();
});

test("a silent socket is closed after a heartbeat without an answer", async () => {
  const { stream } = await open();
  const socket = lastSocket();
  socket.deliver(welcome(1, 2000));
  await advance(2000);
  assert.deepEqual(socket.sent.at(-1), { type: "ping" });
  socket.deliver({ type: "pong" });
  await advance(2000);
  assert.equal(socket.closedWith, null, "answered: still open");
  await advance(2000);
  assert.equal(socket.closedWith, 4000, "no answer for a whole period: closed");
  assert.equal(stream.state, "polling");
  stream.close();
});

test("dataText keeps every digit, over the socket and in poll answers", async () => {
  const { stream, seen } = await open({}, ["events", "issues"]);
  const socket = lastSocket();
  socket.deliver(welcome(0));
  const data = '{"id":"e\\"}{[","n":123456789012345678901234567890,"x":[1,{"y":"]}"}],"d":0.1000000000000000000001}';
  socket.deliver(`{"type":"event","channel":"events","seq":1,"data":${data}}`);
  socket.deliver(`{ "data" : ${data} , "type":"event","channel":"issues","seq":2}`);
  assert.equal(seen.messages[0].dataText, data);
  assert.equal(seen.messages[1].dataText, data);
  assert.equal(seen.messages[0].data.id, 'e"}{[');
  pollHandler = () => ({
    status: 200,
    text: `{"org_id":"o","messages":[{"type":"event","channel":"events","seq":3,"data":${data}},\n {"type":"issue","channel":"issues","seq":4,"data":{}}],"next_after":4}`,
  });
  socket.drop();
  await advance(0);
  assert.deepEqual(seen.messages.map((m) => m.dataText), [data, data, data, "{}"]);
  stream.close();
});

test("url option: http(s), ws(s) and a path prefix", async () => {
  for (const [url, ws, poll] of [
    ["https://gw.example/hooks/", "wss://gw.example/hooks/v1/ws", "https://gw.example/hooks/v1/poll"],
    ["ws://10.0.0.1:8080/v1/ws", "ws://10.0.0.1:8080/v1/ws", "http://10.0.0.1:8080/v1/poll"],
    [undefined, "ws://gw.test/v1/ws", "http://gw.test/v1/poll"],
  ]) {
    const stream = connect({ url });
    assert.equal(stream.wsUrl, ws);
    assert.equal(stream.pollUrl, poll);
    stream.close();
  }
});

// --- Run --------------------------------------------------------------------------------

let passed = 0;
for (const [name, body] of cases) {
  reset();
  if (process.env.VERBOSE) console.log(`case: ${name}`);
  try {
    await body();
    passed += 1;
  } catch (error) {
    console.log(`FAIL client-unit: ${name}\n${error.stack}`);
    process.exit(1);
  }
}
console.log(`PASS client-unit ${passed} cases`);
process.exit(0);
