// hookstream browser client (PROTOCOL.md §5), served as GET /v1/client.js.
// A dependency-free ES module:
//
//   import { connect } from "/v1/client.js";
//   const stream = connect({ token, url });  // both optional: url defaults to
//                                            // the page's origin, no token =
//                                            // the hs_session cookie
//   stream.on("state", (s) => …);   // "connecting" | "open" | "polling" | "closed"
//   stream.on("message", (m) => …); // {type, channel, seq, data}, each seq once
//   stream.subscribe("events");
//   stream.unsubscribe("events");
//   stream.close();
//
// Each message also carries `dataText`: the exact JSON text of `data` as the
// server sent it. `data` comes from JSON.parse, which rounds numbers past
// 2^53 and long decimals; the text keeps every digit (PROTOCOL.md §2).
//
// Beyond the contract, for dashboards: `on("reachable", (bool) => …)` (did
// the last poll get an answer), `on("error", (e) => …)` (server `error`
// messages, and {code: "unauthorized" | "key_revoked" | "signed_out" |
// "session_expired" | "poll_failed" | "history_gap"}; the socket's close
// 4003 is "signed_out" or "session_expired" when its reason says the
// session was signed out or expired, "key_revoked" otherwise),
// `on("reconnect", ({delayMs, attempt}) => …)`, `on("duplicate", …)`, and
// the counters in `stream.stats`. Every `on` returns a function that
// removes the listener.
//
// How it keeps every message exactly once:
// - Each subscribed channel has a high-water mark, the largest seq of that
//   channel handed to the page. A message at or below it is a duplicate and
//   dropped; one above it is handed over and raises the mark. Both sources
//   (the WebSocket and /v1/poll) deliver a channel's messages in seq order
//   without gaps, so the mark never skips a message.
// - A new subscription starts at the newest seq the client knows of (the
//   welcome's `seq`, or the newest seen), and every (re)subscribe sends
//   `after` = the channel's mark, so the server replays what was missed.
// - A poll answer with `next_after` N covers every message of the polled
//   channels up to N, so each polled channel's mark moves to N.
//
// Timing: on a drop the WebSocket reconnects after 1 s, 2 s, 4 s … capped at
// 30 s, each delay drawn from [half, all] of that step ("equal jitter"), so a
// reconnect never comes later than the schedule and a crowd of clients does
// not come back in step. /v1/poll runs every 30 s while the socket is open
// (a safety net) and every 5 s while it is not. A disconnected poll waits up
// to 4 s on the server (`wait_ms`) for news, and one that returned messages
// is followed by the next at once, so a message published while the socket
// is down shows within about a second, not up to 5 s later.

/** Reconnect delay of the first retry. */
export const BACKOFF_FIRST_MS = 1000;
/** Reconnect delays stop growing here. */
export const BACKOFF_MAX_MS = 30000;
/** Poll period while the WebSocket is open. */
export const POLL_OPEN_MS = 30000;
/** Poll period while it is not. */
export const POLL_DISCONNECTED_MS = 5000;
/** How long a disconnected poll may wait on the server for news. */
const POLL_WAIT_MS = 4000;
/** Messages per poll request (the server's maximum). */
const POLL_LIMIT = 1000;
/** Poll pages read in one go when catching up before giving up till next time. */
const POLL_PAGES_MAX = 50;
/** A socket open this long counts as stable: the next drop starts the backoff over. */
const STABLE_MS = 5000;
/** Close code of a revoked key or a signed-out session: reconnecting cannot help. */
const CLOSE_KEY_REVOKED = 4003;
/** The close reason of 4003 when the session was signed out (the key is still valid). */
const REASON_SIGNED_OUT = "signed out";
/** The close reason of 4003 when the session expired (the key is still valid). */
const REASON_SESSION_EXPIRED = "session expired";
/** Message types that carry a channel's data. */
const DATA_TYPES = new Set(["event", "delivery", "issue", "sync"]);

/** The reconnect delay before retry `attempt` (0 = first), without jitter. */
export function backoffStepMs(attempt) {
  return Math.min(BACKOFF_MAX_MS, BACKOFF_FIRST_MS * 2 ** Math.min(attempt, 16));
}

// --- Exact data text ---------------------------------------------------------
// A minimal scanner over JSON text that already parsed, so it needs no
// error handling: it finds where values start and end.

function skipSpace(text, i) {
  while (i < text.length && (text[i] === " " || text[i] === "\n" || text[i] === "\r" || text[i] === "\t")) i += 1;
  return i;
}

/** The index just past the value that starts at or after `i`. */
function skipValue(text, i) {
  i = skipSpace(text, i);
  const first = text[i];
  if (first === '"') {
    i += 1;
    while (i < text.length && text[i] !== '"') i += text[i] === "\\" ? 2 : 1;
    return i + 1;
  }
  if (first === "{" || first === "[") {
    let depth = 0;
    while (i < text.length) {
      const c = text[i];
      if (c === '"') {
        i = skipValue(text, i);
        continue;
      }
      if (c === "{" || c === "[") depth += 1;
      else if (c === "}" || c === "]") {
        depth -= 1;
        if (depth === 0) return i + 1;
      }
      i += 1;
    }
    return i;
  }
  while (i < text.length && !",}] \n\r\t".includes(text[i])) i += 1;
  return i;
}

/** The members of the object at `i`: key -> [start, end) of its value. */
function memberSpans(text, i) {
  const spans = new Map();
  i = skipSpace(text, i) + 1;
  for (;;) {
    i = skipSpace(text, i);
    if (text[i] !== '"') return spans;
    const keyEnd = skipValue(text, i);
    const key = JSON.parse(text.slice(i, keyEnd));
    const start = skipSpace(text, skipSpace(text, keyEnd) + 1);
    const end = skipValue(text, start);
    spans.set(key, [start, end]);
    i = skipSpace(text, end);
    if (text[i] === ",") i += 1;
  }
}

/** The elements of the array at `i`, as [start, end) spans. */
function elementSpans(text, i) {
  const spans = [];
  i = skipSpace(text, i) + 1;
  for (;;) {
    i = skipSpace(text, i);
    if (text[i] === "]" || i >= text.length) return spans;
    const end = skipValue(text, i);
    spans.push([i, end]);
    i = skipSpace(text, end);
    if (text[i] === ",") i += 1;
  }
}

/** The exact text of the `data` member of the envelope object at `start`. */
function dataTextOf(text, start) {
  const span = memberSpans(text, start).get("data");
  return span ? text.slice(span[0], span[1]) : undefined;
}

/** Opens a stream; see the top of this file. */
export function connect(options = {}) {
  return new Stream(options);
}

/**
 * `url` (http, https, ws or wss; with or without a trailing /v1/ws) to the
 * base URLs of both transports.
 */
function endpoints(url) {
  const base = new URL(url || globalThis.location.origin, globalThis.location.href);
  let path = base.pathname.replace(/\/v1\/ws$/, "").replace(/\/+$/, "");
  const secure = base.protocol === "https:" || base.protocol === "wss:";
  const host = base.host;
  return {
    ws: `${secure ? "wss" : "ws"}://${host}${path}/v1/ws`,
    poll: `${secure ? "https" : "http"}://${host}${path}/v1/poll`,
  };
}

class Stream {
  constructor(options) {
    const { ws, poll } = endpoints(options.url);
    /** The API key, or null to use the session cookie. */
    this.token = options.token || null;
    this.wsUrl = ws;
    this.pollUrl = poll;
    /** "connecting" | "open" | "polling" | "closed". */
    this.state = "connecting";
    /** Whether the server answered the last poll (or a welcome came since). */
    this.reachable = true;
    /** Counters for dashboards and tests. */
    this.stats = {
      received: 0, // messages handed to the page
      viaSocket: 0, // … of which came over the WebSocket
      viaPoll: 0, // … and over /v1/poll
      duplicates: 0, // dropped because their seq was already seen
      connects: 0, // welcomes received
      drops: 0, // sockets lost after or before opening
      polls: 0, // poll answers received
      pollFailures: 0, // polls without an answer
      backoffMs: [], // every reconnect delay chosen, in order (last 50)
    };
    this.listeners = new Map();
    /** channel -> high-water mark (largest seq handed over), or null = not yet known. */
    this.marks = new Map();
    /** Newest org seq known (welcome, messages, poll answers); null until one arrives. */
    this.knownSeq = null;
    this.socket = null;
    this.attempt = 0;
    this.reconnectTimer = null;
    this.pollTimer = null;
    this.pollAbort = null;
    this.polling = false;
    this.heartbeatTimer = null;
    this.heardSinceCheck = false;
    /** When the current socket was welcomed. */
    this.openedAt = 0;
    this.closed = false;
    // Let the caller subscribe and add listeners before the first event.
    queueMicrotask(() => {
      if (this.closed) return;
      this.emit("state", this.state);
      this.open();
      // The first poll waits for the socket to have had its chance.
      this.schedulePoll(POLL_DISCONNECTED_MS);
    });
  }

  /** Adds a listener; returns a function that removes it. */
  on(event, listener) {
    if (!this.listeners.has(event)) this.listeners.set(event, new Set());
    this.listeners.get(event).add(listener);
    return () => this.off(event, listener);
  }

  /** Removes a listener. */
  off(event, listener) {
    this.listeners.get(event)?.delete(listener);
  }

  emit(event, value) {
    for (const listener of this.listeners.get(event) || []) {
      try {
        listener(value);
      } catch (error) {
        // A page's listener must not break the stream.
        setTimeout(() => {
          throw error;
        });
      }
    }
  }

  setState(state) {
    if (this.state === state) return;
    this.state = state;
    this.emit("state", state);
  }

  setReachable(reachable) {
    if (this.reachable === reachable) return;
    this.reachable = reachable;
    this.emit("reachable", reachable);
  }

  /** The channels subscribed to. */
  channels() {
    return [...this.marks.keys()];
  }

  subscribe(channel) {
    if (this.closed || this.marks.has(channel)) return;
    this.marks.set(channel, this.knownSeq);
    this.sendSubscribe(channel);
  }

  unsubscribe(channel) {
    if (!this.marks.delete(channel)) return;
    this.send({ type: "unsubscribe", channel });
  }

  close() {
    if (this.closed) return;
    this.closed = true;
    clearTimeout(this.reconnectTimer);
    clearTimeout(this.pollTimer);
    clearInterval(this.heartbeatTimer);
    this.pollAbort?.abort();
    if (this.socket) {
      const socket = this.socket;
      this.socket = null;
      socket.close(1000);
    }
    this.setState("closed");
  }

  // --- WebSocket -----------------------------------------------------------

  isOpen() {
    return this.state === "open" && this.socket !== null;
  }

  send(message) {
    if (this.isOpen()) this.socket.send(JSON.stringify(message));
  }

  sendSubscribe(channel) {
    const mark = this.marks.get(channel);
    // Without a mark (nothing known yet) the welcome will supply one.
    if (mark === null || mark === undefined) return;
    this.send({ type: "subscribe", channel, after: mark });
  }

  open() {
    this.setState("connecting");
    const url = this.token ? `${this.wsUrl}?token=${encodeURIComponent(this.token)}` : this.wsUrl;
    let socket;
    try {
      socket = new WebSocket(url);
    } catch (error) {
      this.emit("error", { code: "invalid_url", message: String(error) });
      this.dropped(null);
      return;
    }
    this.socket = socket;
    socket.onmessage = (event) => this.received(socket, event.data);
    socket.onclose = (event) => {
      if (this.socket === socket) this.dropped(event.code, event.reason);
    };
    // Failures are followed by onclose, which handles them.
    socket.onerror = () => {};
  }

  received(socket, text) {
    if (this.socket !== socket) return;
    this.heardSinceCheck = true;
    let message;
    try {
      message = JSON.parse(text);
    } catch {
      return;
    }
    if (message.type === "welcome") {
      this.welcomed(message);
    } else if (DATA_TYPES.has(message.type)) {
      message.dataText = dataTextOf(text, 0);
      this.deliver(message, "socket");
    } else if (message.type === "error") {
      this.serverError(message);
    } else if (message.type === "subscribed" && message.recovered === false) {
      // Our mark is older than what the server retained: the replay starts
      // at its oldest message, and what came before it is gone.
      this.emit("error", {
        code: "history_gap",
        channel: message.channel,
        message: `some messages of ${message.channel} were published while away and are no longer retained`,
      });
    }
    // subscribed, unsubscribed and pong need nothing.
  }

  welcomed(welcome) {
    this.openedAt = Date.now();
    this.stats.connects += 1;
    this.raiseKnown(welcome.seq);
    for (const [channel, mark] of this.marks) {
      if (mark === null) this.marks.set(channel, this.knownSeq);
    }
    this.setReachable(true);
    this.setState("open");
    for (const channel of this.marks.keys()) this.sendSubscribe(channel);
    this.startHeartbeat(welcome.heartbeat_ms);
    // From now on the slow poll period.
    this.schedulePoll(POLL_OPEN_MS);
  }

  serverError(error) {
    // Not sent by this server (a lost history is `subscribed` with
    // `recovered: false`), kept for servers that do: take what is there
    // from now on, and say that some messages were not seen.
    if (error.code === "history_unavailable" && this.marks.has(error.channel)) {
      this.send({ type: "subscribe", channel: error.channel });
    }
    this.emit("error", error);
  }

  /** Our own liveness check: a ping each heartbeat, and a socket that said nothing for a whole period is closed (and so reconnected). */
  startHeartbeat(heartbeatMs) {
    clearInterval(this.heartbeatTimer);
    const periodMs = Math.max(1000, Number(heartbeatMs) || 30000);
    this.heardSinceCheck = true;
    this.heartbeatTimer = setInterval(() => {
      if (!this.isOpen()) return;
      if (!this.heardSinceCheck) {
        this.socket.close(4000, "no answer to ping");
        this.dropped(null);
        return;
      }
      this.heardSinceCheck = false;
      this.send({ type: "ping" });
    }, periodMs);
  }

  dropped(code, reason = "") {
    clearInterval(this.heartbeatTimer);
    if (this.socket) {
      this.socket.onmessage = null;
      this.socket.onclose = null;
      this.socket = null;
    }
    if (this.closed) return;
    this.stats.drops += 1;
    if (code === CLOSE_KEY_REVOKED) {
      // The server says which: the session signed out (here or in another
      // tab of this browser), or the key itself revoked.
      if (reason === REASON_SIGNED_OUT) {
        this.emit("error", { code: "signed_out", message: "this session was signed out" });
      } else if (reason === REASON_SESSION_EXPIRED) {
        this.emit("error", { code: "session_expired", message: "this session expired" });
      } else {
        this.emit("error", { code: "key_revoked", message: "the API key was revoked" });
      }
      this.close();
      return;
    }
    const wasOpen = this.state === "open";
    // The schedule starts over after a connection that lasted; one that
    // keeps dropping right after opening keeps backing off.
    if (wasOpen && Date.now() - this.openedAt >= STABLE_MS) this.attempt = 0;
    // Whether the server is reachable is for the polls to say: a socket can
    // fail where plain HTTP gets through (a proxy refusing upgrades).
    this.setState("polling");
    const stepMs = backoffStepMs(this.attempt);
    const delayMs = Math.round(stepMs / 2 + (Math.random() * stepMs) / 2);
    this.attempt += 1;
    this.stats.backoffMs.push(delayMs);
    if (this.stats.backoffMs.length > 50) this.stats.backoffMs.shift();
    this.emit("reconnect", { delayMs, attempt: this.attempt });
    clearTimeout(this.reconnectTimer);
    this.reconnectTimer = setTimeout(() => {
      if (!this.closed) this.open();
    }, delayMs);
    // On losing an open socket, or when the very first one fails, catch up
    // by polling right away; then every 5 s till the socket is back.
    if (wasOpen || (this.stats.connects === 0 && this.stats.drops === 1)) this.schedulePoll(0);
  }

  // --- Delivery ------------------------------------------------------------

  raiseKnown(seq) {
    if (typeof seq === "number" && (this.knownSeq === null || seq > this.knownSeq)) {
      this.knownSeq = seq;
    }
  }

  deliver(message, via) {
    const mark = this.marks.get(message.channel);
    if (mark === undefined) return; // unsubscribed meanwhile
    if (mark !== null && message.seq <= mark) {
      this.stats.duplicates += 1;
      this.emit("duplicate", { message, via, mark });
      return;
    }
    this.marks.set(message.channel, message.seq);
    this.raiseKnown(message.seq);
    this.stats.received += 1;
    if (via === "socket") this.stats.viaSocket += 1;
    else this.stats.viaPoll += 1;
    this.emit("message", message);
  }

  // --- Polling -------------------------------------------------------------

  schedulePoll(delayMs) {
    clearTimeout(this.pollTimer);
    if (this.closed) return;
    this.pollTimer = setTimeout(() => this.pollNow(), delayMs);
  }

  async pollNow() {
    if (this.closed) return;
    if (this.polling) return; // the running poll schedules the next
    this.polling = true;
    const startedAt = Date.now();
    let delivered = 0;
    try {
      const before = this.stats.viaPoll;
      await this.pollPages();
      delivered = this.stats.viaPoll - before;
    } finally {
      this.polling = false;
      if (!this.closed) {
        // Fixed rate: the period counts from the start of this poll. A
        // disconnected long-poll that returned news is followed at once by
        // the next one, so a burst is not followed by a blind spot.
        const periodMs = this.isOpen() ? POLL_OPEN_MS : POLL_DISCONNECTED_MS;
        const again = delivered > 0 && !this.isOpen();
        this.schedulePoll(again ? 0 : Math.max(0, periodMs - (Date.now() - startedAt)));
      }
    }
  }

  /** Reads poll pages until caught up. */
  async pollPages() {
    // Channels without a mark yet (subscribed before any welcome or poll
    // answer): a poll without `after` answers the org's current seq and no
    // messages, since a new subscription starts now, not at the oldest
    // retained message. Rare: the welcome gives marks within milliseconds
    // unless the WebSocket cannot open at all.
    const unknown = this.channels().filter((channel) => this.marks.get(channel) === null);
    if (unknown.length > 0) {
      const answer = await this.fetchPoll(unknown, null, 0);
      if (answer === null) return;
      const after = answer.next_after;
      this.raiseKnown(after);
      for (const channel of unknown) {
        if (this.marks.get(channel) === null) this.marks.set(channel, after);
      }
      for (const channel of unknown) this.sendSubscribe(channel);
    }
    for (let page = 0; page < POLL_PAGES_MAX && !this.closed; page += 1) {
      const polled = this.channels().filter((channel) => this.marks.get(channel) !== null);
      if (polled.length === 0) return;
      const after = Math.min(...polled.map((channel) => this.marks.get(channel)));
      const waitMs = page === 0 && !this.isOpen() ? POLL_WAIT_MS : 0;
      const answer = await this.fetchPoll(polled, after, waitMs);
      if (answer === null) return;
      if (answer.recovered === false) {
        // Retention dropped messages after our mark (or the server's data
        // was reset): what follows is all there is.
        for (const channel of polled) {
          this.emit("error", {
            code: "history_gap",
            channel,
            message: `some messages of ${channel} were published while away and are no longer retained`,
          });
        }
      }
      for (const message of answer.messages) this.deliver(message, "poll");
      // Everything of the polled channels up to next_after is handed over.
      for (const channel of polled) {
        const mark = this.marks.get(channel);
        if (mark !== undefined && mark !== null && answer.next_after > mark) {
          this.marks.set(channel, answer.next_after);
        }
      }
      this.raiseKnown(answer.next_after);
      if (answer.messages.length < POLL_LIMIT) return;
    }
  }

  /** One poll; `after` null asks for the current seq (no messages). */
  async fetchPoll(channels, after, waitMs) {
    const query = new URLSearchParams({ channels: channels.join(",") });
    if (after !== null) query.set("after", String(after));
    query.set("limit", String(POLL_LIMIT));
    if (waitMs > 0) query.set("wait_ms", String(waitMs));
    const headers = this.token ? { Authorization: `Bearer ${this.token}` } : {};
    this.pollAbort = new AbortController();
    const timeout = setTimeout(() => this.pollAbort?.abort(), waitMs + 10000);
    let response;
    try {
      response = await fetch(`${this.pollUrl}?${query}`, {
        headers,
        credentials: "same-origin",
        cache: "no-store",
        signal: this.pollAbort.signal,
      });
    } catch (error) {
      if (!this.closed) {
        this.stats.pollFailures += 1;
        this.setReachable(false);
      }
      return null;
    } finally {
      clearTimeout(timeout);
    }
    if (response.status === 401 || response.status === 403) {
      this.stats.pollFailures += 1;
      this.setReachable(true);
      this.emit("error", {
        code: "unauthorized",
        message: `the server refused the credentials (${response.status})`,
      });
      return null;
    }
    if (!response.ok) {
      this.stats.pollFailures += 1;
      this.emit("error", { code: "poll_failed", message: `GET /v1/poll answered ${response.status}` });
      return null;
    }
    let answer;
    try {
      const text = await response.text();
      answer = JSON.parse(text);
      const messages = memberSpans(text, 0).get("messages");
      if (messages) {
        elementSpans(text, messages[0]).forEach(([start], n) => {
          if (answer.messages[n]) answer.messages[n].dataText = dataTextOf(text, start);
        });
      }
    } catch {
      this.stats.pollFailures += 1;
      return null;
    }
    this.stats.polls += 1;
    this.setReachable(true);
    return answer;
  }
}
