"""Python `websockets` client for tests/compression.rs: connects with the
library's defaults (permessage-deflate offered), subscribes to `events` and
`issues`, prints `ready <Sec-WebSocket-Extensions>`, then prints the
`data`-carrying messages it receives, one JSON line each, until it has
COUNT of them.

Usage: python3 client.py URL COUNT
"""

import json
import sys

from websockets.sync.client import connect


def main():
    url, count = sys.argv[1], int(sys.argv[2])
    with connect(url, open_timeout=10, close_timeout=2) as ws:
        extensions = ws.response.headers.get("Sec-WebSocket-Extensions", "")
        welcome = json.loads(ws.recv(timeout=10))
        assert welcome["type"] == "welcome", welcome
        for channel in ("events", "issues"):
            ws.send(json.dumps({"type": "subscribe", "channel": channel}))
            reply = json.loads(ws.recv(timeout=10))
            assert reply == {"type": "subscribed", "channel": channel}, reply
        print("ready " + extensions, flush=True)
        received = 0
        while received < count:
            message = json.loads(ws.recv(timeout=10))
            if "data" in message:
                print(json.dumps(message), flush=True)
                received += 1


if __name__ == "__main__":
    main()
