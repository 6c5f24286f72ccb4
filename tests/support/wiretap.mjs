// A TCP proxy in front of a node that reads the WebSocket frames going through it
// in both directions, for the tests that must see what a client library or a
// browser hides: the upgrade's response headers and the RSV1 bit of each frame
// (set: the frame's message is compressed). Plain HTTP connections (a page and its
// script) pass through unread.

import net from "node:net";
import { freePort } from "./processes.mjs";

/** Frames of one direction of one connection, parsed as they pass. */
class Direction {
  constructor() {
    this.buf = Buffer.alloc(0);
    this.head = null;
    /** {fin, rsv1, opcode, length} of every frame seen. */
    this.frames = [];
    /** Not (or not yet known to be) a WebSocket: frames are not parsed. */
    this.http = false;
  }
  push(chunk) {
    if (this.http) return;
    this.buf = Buffer.concat([this.buf, chunk]);
    if (this.head === null) {
      const end = this.buf.indexOf("\r\n\r\n");
      if (end < 0) return;
      this.head = this.buf.subarray(0, end).toString("latin1");
      this.buf = this.buf.subarray(end + 4);
    }
    for (;;) {
      if (this.buf.length < 2) return;
      const b0 = this.buf[0], b1 = this.buf[1];
      let length = b1 & 0x7f, at = 2;
      if (length === 126) {
        if (this.buf.length < 4) return;
        length = this.buf.readUInt16BE(2); at = 4;
      } else if (length === 127) {
        if (this.buf.length < 10) return;
        length = Number(this.buf.readBigUInt64BE(2)); at = 10;
      }
      if (b1 & 0x80) at += 4;
      if (this.buf.length < at + length) return;
      this.frames.push({ fin: !!(b0 & 0x80), rsv1: !!(b0 & 0x40), opcode: b0 & 0x0f, length });
      this.buf = this.buf.subarray(at + length);
    }
  }
}

/**
 * Starts a proxy to the node on `port`. `sockets()` lists the WebSocket
 * connections through it, each with `toServer` and `toClient` (each with `head`,
 * the request or response head, and `frames`).
 */
export async function wiretap(port) {
  const listen = await freePort();
  const connections = [];
  const server = net.createServer((client) => {
    const upstream = net.connect(port, "127.0.0.1");
    const seen = { toServer: new Direction(), toClient: new Direction() };
    connections.push(seen);
    client.on("data", (d) => { seen.toServer.push(d); upstream.write(d); });
    upstream.on("data", (d) => {
      seen.toClient.push(d);
      // Plain HTTP (a page, a script): nothing to parse on this connection.
      if (seen.toClient.head !== null && !seen.toClient.head.startsWith("HTTP/1.1 101")) {
        seen.toClient.http = seen.toServer.http = true;
      }
      client.write(d);
    });
    client.on("end", () => upstream.end());
    upstream.on("end", () => client.end());
    client.on("error", () => upstream.destroy());
    upstream.on("error", () => client.destroy());
  });
  await new Promise((r) => server.listen(listen, "127.0.0.1", r));
  const sockets = () => connections.filter((c) => !c.toClient.http && c.toClient.head !== null);
  return {
    port: listen,
    url: `ws://127.0.0.1:${listen}/ws`,
    http: `http://127.0.0.1:${listen}`,
    /** The upgraded connections through the proxy, in order. */
    sockets,
    /** The data frames (text, binary, continuation) the node sent on socket `i`. */
    sent: (i) => sockets()[i].toClient.frames.filter((f) => f.opcode <= 2),
    /** The data frames the client sent on socket `i`. */
    received: (i) => sockets()[i].toServer.frames.filter((f) => f.opcode <= 2),
    /** The Sec-WebSocket-Extensions of socket `i`'s upgrade response. */
    extensions(i) {
      const line = sockets()[i].toClient.head.split("\r\n")
        .find((l) => l.toLowerCase().startsWith("sec-websocket-extensions:"));
      return line?.slice(line.indexOf(":") + 1).trim() ?? null;
    },
    close() { server.close(); },
  };
}
