// The dashboard page (GET /): sign in with an API key, pick channels, watch
// messages arrive. All transport logic is in /v1/client.js; this file only
// draws. Text from the server is always set with textContent, never parsed
// as HTML.

import { connect, POLL_DISCONNECTED_MS } from "/v1/client.js";

/** Messages kept on the page; older ones are removed as new ones arrive. */
const MESSAGES_SHOWN_MAX = 500;
/** Where the chosen channels are remembered (never the key). */
const CHANNELS_STORAGE_KEY = "hookstream.channels";
const DEFAULT_CHANNELS = ["events", "deliveries", "issues"];
const ID_PATTERN = /^[A-Za-z0-9_.-]{1,128}$/;

const $ = (id) => document.getElementById(id);

/** The open stream, or null while signed out. */
let stream = null;
/** Messages received per type since sign-in. */
let typeCounts = { event: 0, delivery: 0, issue: 0, sync: 0 };
/** When the next reconnect attempt is due (ms since epoch), for the banner. */
let reconnectAt = 0;
let tickTimer = null;

// A handle for debugging from the console (and for the browser tests).
window.hookstreamDashboard = {
  get stream() {
    return stream;
  },
};

function show(element, visible) {
  element.hidden = !visible;
}

function setBanner(text, severe) {
  const banner = $("banner");
  banner.textContent = text || "";
  banner.classList.toggle("bad", Boolean(severe));
  show(banner, Boolean(text));
}

// --- Sessions ----------------------------------------------------------------

async function start() {
  let response;
  try {
    response = await fetch("/v1/sessions", { cache: "no-store" });
  } catch {
    setBanner(
      `Cannot reach the hookstream server at ${location.origin}. Retrying every ${POLL_DISCONNECTED_MS / 1000} s…`,
      true,
    );
    setTimeout(start, POLL_DISCONNECTED_MS);
    return;
  }
  setBanner("");
  if (response.ok) {
    showLive(await response.json());
  } else {
    showSignIn("");
  }
}

function showSignIn(error) {
  show($("session"), false);
  show($("live-panel"), false);
  show($("sign-in-panel"), true);
  const errorLine = $("sign-in-error");
  errorLine.textContent = error;
  show(errorLine, Boolean(error));
  $("key").focus();
}

async function signIn(event) {
  event.preventDefault();
  const key = $("key").value.trim();
  if (!key) return;
  let response;
  try {
    response = await fetch("/v1/sessions", {
      method: "POST",
      headers: { Authorization: `Bearer ${key}` },
      cache: "no-store",
    });
  } catch {
    showSignIn(`Cannot reach the hookstream server at ${location.origin}.`);
    return;
  }
  if (response.ok) {
    $("key").value = "";
    showLive(await response.json());
  } else if (response.status === 429) {
    showSignIn("Too many failed attempts from this address; wait a minute and try again.");
  } else {
    showSignIn("That key was not accepted (unknown, revoked or mistyped).");
  }
}

async function signOut() {
  stopStream();
  try {
    await fetch("/v1/sessions", { method: "DELETE", cache: "no-store" });
  } catch {
    // The cookie expires by itself; the page is signed out either way.
  }
  setBanner("");
  showSignIn("");
}

// --- The live view -------------------------------------------------------------

function savedChannels() {
  try {
    const saved = JSON.parse(localStorage.getItem(CHANNELS_STORAGE_KEY));
    if (Array.isArray(saved) && saved.every((c) => typeof c === "string")) return saved;
  } catch {
    // Fall through to the defaults.
  }
  return DEFAULT_CHANNELS;
}

function saveChannels() {
  localStorage.setItem(CHANNELS_STORAGE_KEY, JSON.stringify(stream.channels()));
}

function showLive(who) {
  show($("sign-in-panel"), false);
  show($("live-panel"), true);
  show($("session"), true);
  $("org").textContent = who.org_id;
  clearMessages();
  typeCounts = { event: 0, delivery: 0, issue: 0, sync: 0 };
  stopStream();
  stream = connect();
  stream.on("state", drawState);
  stream.on("reachable", drawReachable);
  stream.on("message", drawMessage);
  stream.on("reconnect", ({ delayMs }) => {
    reconnectAt = Date.now() + delayMs;
  });
  stream.on("error", (error) => {
    if (error.code === "signed_out") {
      stopStream();
      showSignIn("You were signed out (here or in another tab). Sign in again.");
    } else if (error.code === "session_expired") {
      stopStream();
      showSignIn("Your session expired. Sign in again.");
    } else if (error.code === "key_revoked") {
      stopStream();
      showSignIn("The API key of this session was revoked. Sign in with another key.");
    } else if (error.code === "unauthorized") {
      stopStream();
      showSignIn("Your session ended (expired, signed out elsewhere, or its key was revoked). Sign in again.");
    } else if (error.code === "history_gap") {
      setBanner(`Some messages were missed: ${error.message}.`, false);
    } else if (error.code === "poll_failed") {
      setBanner(`The server answered a poll with an error: ${error.message}.`, false);
    }
  });
  for (const channel of savedChannels()) stream.subscribe(channel);
  drawChannels();
  tickTimer = setInterval(tick, 500);
  tick();
}

function stopStream() {
  if (stream) stream.close();
  stream = null;
  clearInterval(tickTimer);
}

function drawState(state) {
  const badge = $("state");
  badge.textContent = state;
  badge.dataset.state = state;
  tick();
}

function drawReachable(reachable) {
  if (reachable) {
    setBanner("");
  }
  tick();
}

/** Redraws what changes with time: counters and the reconnect countdown. */
function tick() {
  if (!stream) return;
  const stats = stream.stats;
  $("count-received").textContent = stats.received;
  $("count-duplicates").textContent = stats.duplicates;
  $("count-reconnects").textContent = Math.max(0, stats.connects - 1);
  $("count-polls").textContent = stats.polls;
  for (const [type, count] of Object.entries(typeCounts)) $(`count-${type}`).textContent = count;
  const waitingS = Math.max(0, Math.ceil((reconnectAt - Date.now()) / 1000));
  const down = stream.state === "polling" || stream.state === "connecting";
  $("reconnect").textContent =
    stream.state === "polling" ? `WebSocket down; next attempt in ${waitingS} s, polling every ${POLL_DISCONNECTED_MS / 1000} s` : "";
  if (down && !stream.reachable) {
    setBanner(
      `Cannot reach the hookstream server at ${location.origin}. ` +
        (stream.state === "connecting" || waitingS === 0 ? "Trying to reconnect now… " : `Next attempt in ${waitingS} s. `) +
        "Messages published meanwhile will be shown once it is back.",
      true,
    );
  } else if (down && stream.state === "polling" && stream.stats.polls > 0) {
    setBanner(
      `The WebSocket is not connected (a proxy may be blocking it); messages arrive by polling every ${POLL_DISCONNECTED_MS / 1000} s until it is.`,
      false,
    );
  } else if (stream.state === "open") {
    setBanner("");
  }
}

function drawMessage(message) {
  if (message.type in typeCounts) typeCounts[message.type] += 1;
  const item = document.createElement("li");
  item.dataset.seq = message.seq;
  item.dataset.channel = message.channel;
  item.dataset.type = message.type;
  const meta = document.createElement("div");
  meta.className = "meta";
  const parts = [
    ["type", message.type],
    ["channel", message.channel],
    ["seq", `seq ${message.seq}`],
    ["time", new Date().toLocaleTimeString()],
  ];
  for (const [className, text] of parts) {
    const span = document.createElement("span");
    span.className = className;
    span.textContent = text;
    meta.append(span);
  }
  const body = document.createElement("pre");
  // The exact text, so a 30-digit number shows every digit.
  body.textContent =
    message.dataText !== undefined ? indentJson(message.dataText) : JSON.stringify(message.data, null, 2);
  item.append(meta, body);
  const list = $("messages");
  list.prepend(item);
  while (list.childElementCount > MESSAGES_SHOWN_MAX) list.lastElementChild.remove();
  show($("empty"), false);
  tick();
}

/**
 * JSON text re-indented by two spaces, tokens kept exactly as they are
 * (JSON.stringify(JSON.parse(…)) would round long numbers).
 */
function indentJson(text) {
  let out = "";
  let depth = 0;
  const newline = () => `\n${"  ".repeat(depth)}`;
  for (let i = 0; i < text.length; i += 1) {
    const c = text[i];
    if (c === '"') {
      let end = i + 1;
      while (end < text.length && text[end] !== '"') end += text[end] === "\\" ? 2 : 1;
      out += text.slice(i, end + 1);
      i = end;
    } else if (c === "{" || c === "[") {
      let next = i + 1;
      while (/\s/.test(text[next] || "")) next += 1;
      if (text[next] === (c === "{" ? "}" : "]")) {
        out += c + text[next];
        i = next;
      } else {
        depth += 1;
        out += c + newline();
      }
    } else if (c === "}" || c === "]") {
      depth -= 1;
      out += newline() + c;
    } else if (c === ",") {
      out += `,${newline()}`;
    } else if (c === ":") {
      out += ": ";
    } else if (!/\s/.test(c)) {
      out += c;
    }
  }
  return out;
}

function clearMessages() {
  $("messages").replaceChildren();
  show($("empty"), true);
}

// --- Channels --------------------------------------------------------------------

function drawChannels() {
  const channels = new Set(stream.channels());
  for (const box of document.querySelectorAll(".fixed-channel")) {
    box.checked = channels.has(box.value);
  }
  const list = $("extra-channels");
  list.replaceChildren();
  for (const channel of channels) {
    if (DEFAULT_CHANNELS.includes(channel)) continue;
    const item = document.createElement("li");
    item.dataset.channel = channel;
    item.append(channel);
    const remove = document.createElement("button");
    remove.type = "button";
    remove.title = `unsubscribe from ${channel}`;
    remove.textContent = "×";
    remove.addEventListener("click", () => {
      stream.unsubscribe(channel);
      saveChannels();
      drawChannels();
    });
    item.append(remove);
    list.append(item);
  }
}

function toggleFixedChannel(event) {
  if (!stream) return;
  const channel = event.target.value;
  if (event.target.checked) stream.subscribe(channel);
  else stream.unsubscribe(channel);
  saveChannels();
}

function addChannel(event) {
  event.preventDefault();
  if (!stream) return;
  const id = $("channel-id").value.trim();
  if (!ID_PATTERN.test(id)) return;
  stream.subscribe(`${$("channel-kind").value}:${id}`);
  $("channel-id").value = "";
  saveChannels();
  drawChannels();
}

$("sign-in").addEventListener("submit", signIn);
$("sign-out").addEventListener("click", signOut);
$("add-channel").addEventListener("submit", addChannel);
$("clear").addEventListener("click", clearMessages);
for (const box of document.querySelectorAll(".fixed-channel")) {
  box.addEventListener("change", toggleFixedChannel);
}
start();
