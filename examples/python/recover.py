"""A minimal wsrelay subscriber that never loses a message silently (protocol v1).

It follows one channel with history, remembers the epoch and the last offset it
received, and after any disconnect subscribes again with `since`: the relay replays
what was missed, or answers `recovered: false` (then reload your state). Every
offset it prints is the next one, or it says there was a gap.

    pip install websockets
    python recover.py ws://127.0.0.1:8081/ws ws://127.0.0.1:8082/ws --channel chat:1
"""

import argparse
import asyncio
import json
import random

import websockets


async def follow(urls, channel, until=None):
    epoch, offset, attempt = None, None, 0
    while True:
        url = urls[attempt % len(urls)]  # next node, as a load balancer would
        try:
            async with websockets.connect(url, subprotocols=["wsrelay.v1"]) as ws:
                sub = {"op": "sub", "ch": channel, "id": 1}
                if epoch is not None:
                    sub["since"] = {"epoch": epoch, "offset": offset}
                await ws.send(json.dumps(sub))
                async for text in ws:
                    frame = json.loads(text)
                    op = frame.get("op")
                    if op == "ack" and frame.get("id") == 1:
                        if frame.get("recovered") is False:
                            print(f"gap: reload state (now {frame['epoch']}:{frame['offset']})", flush=True)
                        epoch = frame["epoch"]
                        offset = max(offset or 0, frame["offset"]) if frame.get("recovered") else frame["offset"]
                        attempt = 0
                    elif op == "msg" and frame.get("ch") == channel:
                        if offset is not None and frame["offset"] <= offset:
                            continue  # a duplicate: offsets only grow
                        offset = frame["offset"]
                        print(offset, json.dumps(frame["data"]), flush=True)
                        if until is not None and offset >= until:
                            return
                    elif op == "gap" and frame.get("ch") == channel:
                        epoch, offset = frame["epoch"], frame["offset"]
                        print(f"gap: reload state (now {epoch}:{offset})", flush=True)
                    elif op == "error":
                        print(f"error {frame['code']}: {frame['message']}", flush=True)
        except (OSError, websockets.ConnectionClosed, websockets.InvalidHandshake):
            pass
        attempt += 1
        # Full jitter, 0.1 s doubling to 5 s.
        await asyncio.sleep(random.uniform(0, min(5.0, 0.1 * 2 ** attempt)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("urls", nargs="+", help="node WebSocket URLs, tried in turn")
    parser.add_argument("--channel", required=True)
    parser.add_argument("--until", type=int, help="exit after this offset")
    args = parser.parse_args()
    asyncio.run(follow(args.urls, args.channel, args.until))


if __name__ == "__main__":
    main()
