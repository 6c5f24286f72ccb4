"""Follow a wsrelay channel over Server-Sent Events with nothing but Python's
standard library: no WebSocket, no wsrelay library.

The relay puts the client's place in every history channel into each event's `id`;
after any disconnect the script connects again (to the next node, as a load
balancer would) with that id as `Last-Event-ID`, and the relay replays exactly what
was missed. Every offset it prints is the next one.

    python sse_follow.py http://127.0.0.1:8081 http://127.0.0.1:8082 --channel news
"""

import argparse
import json
import sys
import time
import urllib.parse
import urllib.request


def follow(bases, channel, until=None):
    last_id, attempt = None, 0
    while True:
        base = bases[attempt % len(bases)]
        attempt += 1
        url = f"{base}/sse?{urllib.parse.urlencode({'channel': channel})}"
        headers = {"Accept": "text/event-stream"}
        if last_id is not None:
            headers["Last-Event-ID"] = last_id
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as stream:
                event_id, data = None, []
                for raw in stream:
                    line = raw.decode("utf-8").rstrip("\r\n")
                    if line.startswith("id: "):
                        event_id = line[4:]
                    elif line.startswith("data: "):
                        data.append(line[6:])
                    elif line == "":
                        # The end of one event.
                        if event_id is not None:
                            last_id = event_id
                        if data:
                            frame = json.loads("\n".join(data))
                            if frame["op"] == "msg":
                                print(frame["offset"], json.dumps(frame["data"]), flush=True)
                                if until is not None and frame["offset"] >= until:
                                    return
                            elif frame["op"] == "gap":
                                print(f"gap: reload (epoch {frame['epoch']})", flush=True)
                            elif frame["op"] == "close":
                                print(f"closed {frame['code']}: {frame['reason']}", file=sys.stderr)
                        event_id, data = None, []
        except OSError as error:
            print(f"stream failed: {error}", file=sys.stderr)
        time.sleep(0.2)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bases", nargs="+", help="node base URLs, e.g. http://127.0.0.1:8081")
    parser.add_argument("--channel", required=True)
    parser.add_argument("--until", type=int, help="exit after this offset")
    args = parser.parse_args()
    follow(args.bases, args.channel, args.until)
