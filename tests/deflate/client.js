// Node `ws` client for tests/compression.rs: offers permessage-deflate
// (`perMessageDeflate: true`), subscribes to `events` and `issues`, prints
// `ready <negotiated extensions>`, then prints the `data`-carrying messages
// it receives, one JSON line each, until it has COUNT of them.
//
// Usage: node client.js URL COUNT
'use strict';

const WebSocket = require('ws');

const [url, countText] = process.argv.slice(2);
const count = Number(countText);
const ws = new WebSocket(url, { perMessageDeflate: true });
const timer = setTimeout(() => {
  console.error('client.js: timed out');
  process.exit(2);
}, 20000);

let extensions = '';
ws.on('upgrade', (response) => {
  extensions = response.headers['sec-websocket-extensions'] || '';
});

let subscribed = 0;
let received = 0;
ws.on('message', (data, isBinary) => {
  if (isBinary) throw new Error('binary message');
  const message = JSON.parse(data.toString('utf8'));
  if (message.type === 'welcome') {
    // Large enough to pass ws's 1 KiB threshold: sent compressed.
    const pad = 'x'.repeat(2000);
    ws.send(JSON.stringify({ type: 'subscribe', channel: 'events', pad }));
    ws.send(JSON.stringify({ type: 'subscribe', channel: 'issues' }));
  } else if (message.type === 'subscribed') {
    subscribed += 1;
    if (subscribed === 2) {
      // What the server answered, and that ws took it up.
      if (!String(ws.extensions).includes('permessage-deflate')) extensions = '';
      console.log('ready ' + extensions);
    }
  } else if ('data' in message) {
    console.log(JSON.stringify(message));
    received += 1;
    if (received === count) {
      clearTimeout(timer);
      ws.close(1000);
    }
  } else {
    throw new Error('unexpected ' + JSON.stringify(message));
  }
});
ws.on('error', (e) => {
  console.error('client.js:', e.message);
  process.exit(1);
});
