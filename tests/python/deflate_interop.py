"""permessage-deflate with Python's `websockets` (its default client compression)
against a node, for tests/compression.rs. Prints one JSON object: what was
negotiated, what came back, and how the node closed a deflate bomb.

usage: python deflate_interop.py ws://host:port/ws
"""
import asyncio
import json
import sys

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from websockets.extensions.permessage_deflate import PerMessageDeflate

URL = sys.argv[1]
WAIT = 10


def ticker(seq):
    return {
        "type": "ticker", "symbol": "BTC-USD", "exchange": "coinbase", "seq": seq,
        "bid": 67995.74, "ask": 67995.88, "ts": 1767275842989 + seq,
        "trades": [{"trade_id": 629537871 + k, "price": 67995.91, "size": 0.68916406,
                    "side": "sell" if k % 2 else "buy"} for k in range(6)],
    }


async def main():
    report = {}
    async with connect(f"{URL}?channel=py:feed", subprotocols=["wsrelay.v1"]) as ws:
        report["extensions_header"] = ws.response.headers.get("Sec-WebSocket-Extensions")
        report["subprotocol"] = ws.subprotocol
        deflate = [e for e in ws.protocol.extensions if isinstance(e, PerMessageDeflate)]
        report["deflate"] = bool(deflate)
        if deflate:
            # remote: the server's compressor; local: ours.
            report["server_no_context_takeover"] = deflate[0].remote_no_context_takeover
            report["client_no_context_takeover"] = deflate[0].local_no_context_takeover
        welcome = json.loads(await asyncio.wait_for(ws.recv(), WAIT))
        report["welcome"] = welcome["op"]
        # websockets compresses every message once deflate is agreed.
        sent = [ticker(i) for i in range(3)]
        for i, data in enumerate(sent):
            await ws.send(json.dumps({"op": "pub", "ch": "py:feed", "data": data, "id": i + 1}))
        got = []
        while len(got) < len(sent):
            frame = json.loads(await asyncio.wait_for(ws.recv(), WAIT))
            if frame["op"] == "msg":
                got.append(frame["data"])
        report["round_trip_intact"] = got == sent

    async with connect(f"{URL}?channel=py:bomb") as bomb:
        await asyncio.wait_for(bomb.recv(), WAIT)
        # 16 MB of one letter: ~16 KB once compressed.
        await bomb.send("a" * (16 << 20))
        try:
            await asyncio.wait_for(bomb.recv(), WAIT)
            report["bomb_close_code"] = None
        except ConnectionClosed as e:
            report["bomb_close_code"] = e.rcvd.code if e.rcvd else None
    print(json.dumps(report))


asyncio.run(main())
