'use strict';
// A peer gateway for the issue 6 benchmarks: the part of hookstream's
// contract (docs/PROTOCOL.md §2–§3) the scenarios use, written the way a Node
// team would write it with the `ws` library:
//
// - GET /v1/ws?token=KEY upgrades (401 without the key); the first message is
//   {"type":"welcome","org_id","connection_id","seq","heartbeat_ms"};
// - {"type":"subscribe","channel":"events"} (or "events:<source_id>") is
//   answered {"type":"subscribed","channel":…}; unsubscribe and ping too;
// - POST /v1/publish on the admin listener (Authorization: Bearer TOKEN) with
//   one event or a JSON array of events: each gets the next seq, is serialized
//   ONCE into a Buffer, and that Buffer is sent to every subscriber of
//   `events` and `events:<source_id>`; the answer is 202 {"accepted","seqs"};
// - a heartbeat ping every 30 s, terminating connections that did not answer.
//
// Batches: when one request carries several messages, each subscriber's
// socket is corked for the whole batch so its frames leave in one write
// (ws itself corks per frame; nested corks are counted by Node).
//
// Usage: node server.js --listen 127.0.0.1:8080 --admin-listen 127.0.0.1:8081
//                       --token KEY --admin-token TOKEN [--org bench]
//                       [--per-message-deflate 1]

const http = require('http');
const { WebSocketServer } = require('ws');

function args() {
  const out = {
    listen: '127.0.0.1:8080',
    'admin-listen': '127.0.0.1:8081',
    token: '',
    'admin-token': '',
    org: 'bench',
    'heartbeat-ms': '30000',
    // permessage-deflate as ws does it: a compressor (and its window) per
    // connection, each message compressed once per subscriber. 0 = off.
    'per-message-deflate': '0',
  };
  const argv = process.argv.slice(2);
  for (let i = 0; i < argv.length; i += 2) {
    const name = argv[i].replace(/^--/, '');
    if (!(name in out) || i + 1 >= argv.length) {
      console.error(`usage: node server.js --listen H:P --admin-listen H:P --token KEY --admin-token T [--org ORG]`);
      process.exit(2);
    }
    out[name] = argv[i + 1];
  }
  if (!out.token || !out['admin-token']) {
    console.error('--token and --admin-token are required');
    process.exit(2);
  }
  return out;
}

function hostPort(text) {
  const at = text.lastIndexOf(':');
  return { host: text.slice(0, at), port: Number(text.slice(at + 1)) };
}

const config = args();
const heartbeatMs = Number(config['heartbeat-ms']);
const ID = /^[A-Za-z0-9_.-]{1,128}$/;

let seq = 0;
let nextConnectionId = 1;
/** channel name → Set of sockets subscribed to it */
const channels = new Map();

function subscribe(ws, channel) {
  let set = channels.get(channel);
  if (!set) {
    set = new Set();
    channels.set(channel, set);
  }
  set.add(ws);
  ws.channels.add(channel);
}

function unsubscribe(ws, channel) {
  const set = channels.get(channel);
  if (set) {
    set.delete(ws);
    if (set.size === 0) channels.delete(channel);
  }
  ws.channels.delete(channel);
}

function validChannel(channel) {
  if (channel === 'events') return true;
  return typeof channel === 'string' && channel.startsWith('events:') && ID.test(channel.slice(7));
}

const wss = new WebSocketServer({
  noServer: true,
  clientTracking: true,
  maxPayload: 64 * 1024,
  // ws's defaults (context takeover, 15-bit windows) with the threshold
  // hookstream uses (--compression-min-bytes 256) instead of 1 KiB.
  perMessageDeflate: config['per-message-deflate'] === '1' ? { threshold: 256 } : false,
});

wss.on('connection', (ws) => {
  ws.channels = new Set();
  ws.isAlive = true;
  ws.badInRow = 0;
  ws.on('pong', () => {
    ws.isAlive = true;
  });
  ws.send(
    JSON.stringify({
      type: 'welcome',
      org_id: config.org,
      connection_id: `c_${nextConnectionId++}`,
      seq,
      heartbeat_ms: heartbeatMs,
    })
  );
  ws.on('message', (data, isBinary) => {
    ws.isAlive = true;
    if (isBinary) {
      ws.close(1003, 'binary message');
      return;
    }
    let message;
    try {
      message = JSON.parse(data);
    } catch {
      return bad(ws, 'invalid_json', 'not JSON');
    }
    switch (message && message.type) {
      case 'subscribe':
        if (!validChannel(message.channel)) return bad(ws, 'unknown_channel', 'unknown channel', message.channel);
        subscribe(ws, message.channel);
        ws.badInRow = 0;
        ws.send(JSON.stringify({ type: 'subscribed', channel: message.channel }));
        return;
      case 'unsubscribe':
        if (!validChannel(message.channel)) return bad(ws, 'unknown_channel', 'unknown channel', message.channel);
        unsubscribe(ws, message.channel);
        ws.badInRow = 0;
        ws.send(JSON.stringify({ type: 'unsubscribed', channel: message.channel }));
        return;
      case 'ping':
        ws.badInRow = 0;
        ws.send('{"type":"pong"}');
        return;
      default:
        return bad(ws, 'unknown_type', 'unknown type');
    }
  });
  ws.on('close', () => {
    for (const channel of ws.channels) unsubscribe(ws, channel);
  });
  ws.on('error', () => {});
});

function bad(ws, code, text, channel) {
  const reply = { type: 'error', code, message: text };
  if (channel !== undefined) reply.channel = channel;
  ws.send(JSON.stringify(reply));
  if (++ws.badInRow >= 20) ws.close(1008, 'policy violation');
}

const heartbeat = setInterval(() => {
  for (const ws of wss.clients) {
    if (!ws.isAlive) {
      ws.terminate();
      continue;
    }
    ws.isAlive = false;
    ws.ping();
  }
}, heartbeatMs);
heartbeat.unref();

const publicServer = http.createServer((req, res) => {
  res.writeHead(404, { 'content-type': 'application/json' });
  res.end('{"error":"not_found"}');
});

publicServer.on('upgrade', (req, socket, head) => {
  const url = new URL(req.url, 'http://localhost');
  if (url.pathname !== '/v1/ws') {
    socket.end('HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n');
    return;
  }
  if (url.searchParams.get('token') !== config.token) {
    const body = '{"error":"unauthorized"}';
    socket.end(
      `HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\ncontent-length: ${body.length}\r\n\r\n${body}`
    );
    return;
  }
  wss.handleUpgrade(req, socket, head, (ws) => wss.emit('connection', ws, req));
});

/** Validates one message; returns an error string or null. */
function invalid(message) {
  if (!message || typeof message !== 'object' || Array.isArray(message)) return 'not an object';
  if (message.org_id !== config.org) return 'unknown org';
  if (message.type !== 'event') return 'only events are supported by this peer';
  const data = message.data;
  if (!data || typeof data !== 'object' || Array.isArray(data)) return 'data must be an object';
  if (typeof data.source_id !== 'string' || !ID.test(data.source_id)) return 'data.source_id must be an id';
  return null;
}

function publish(messages) {
  const seqs = [];
  const corked = [];
  const batch = messages.length > 1;
  for (const message of messages) {
    seq += 1;
    seqs.push(seq);
    const data = JSON.stringify(message.data);
    for (const channel of ['events', `events:${message.data.source_id}`]) {
      const set = channels.get(channel);
      if (!set || set.size === 0) continue;
      // Serialized once per message and channel; every subscriber gets the same Buffer.
      const frame = Buffer.from(`{"type":"event","channel":"${channel}","seq":${seq},"data":${data}}`);
      for (const ws of set) {
        if (ws.readyState !== 1) continue;
        if (batch && !ws.corked) {
          ws.corked = true;
          ws._socket.cork();
          corked.push(ws);
        }
        ws.send(frame, { binary: false });
      }
    }
  }
  for (const ws of corked) {
    ws.corked = false;
    ws._socket.uncork();
  }
  return seqs;
}

function reply(res, status, body) {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
  res.end(text);
}

const adminServer = http.createServer((req, res) => {
  if (req.method === 'GET' && (req.url === '/healthz' || req.url === '/readyz')) {
    return reply(res, 200, { ok: true });
  }
  if (req.headers.authorization !== `Bearer ${config['admin-token']}`) {
    return reply(res, 401, { error: 'unauthorized' });
  }
  if (req.method !== 'POST' || req.url !== '/v1/publish') {
    return reply(res, 404, { error: 'not_found' });
  }
  const chunks = [];
  let size = 0;
  req.on('data', (chunk) => {
    size += chunk.length;
    if (size > 16 * 1024 * 1024) {
      reply(res, 413, { error: 'too_large' });
      req.destroy();
      return;
    }
    chunks.push(chunk);
  });
  req.on('end', () => {
    let body;
    try {
      body = JSON.parse(Buffer.concat(chunks));
    } catch {
      return reply(res, 400, { error: 'invalid_message', index: 0, reason: 'not JSON' });
    }
    const messages = Array.isArray(body) ? body : [body];
    for (let i = 0; i < messages.length; i++) {
      const reason = invalid(messages[i]);
      if (reason) return reply(res, 400, { error: 'invalid_message', index: i, reason });
    }
    const seqs = publish(messages);
    reply(res, 202, { accepted: seqs.length, seqs });
  });
});

const pub = hostPort(config.listen);
const adm = hostPort(config['admin-listen']);
publicServer.listen(pub.port, pub.host, () => {
  adminServer.listen(adm.port, adm.host, () => {
    console.error(
      `node-ws peer listening on ws://${config.listen}/v1/ws (admin http://${config['admin-listen']}), ws ${require('ws/package.json').version}, node ${process.version}`
    );
  });
});

function stop() {
  clearInterval(heartbeat);
  for (const ws of wss.clients) ws.close(1001, 'server shutting down');
  publicServer.close();
  adminServer.close();
  setTimeout(() => process.exit(0), 500).unref();
}
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
