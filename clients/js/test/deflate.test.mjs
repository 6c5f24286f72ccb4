// permessage-deflate with Node's `ws` (compression on by default on its client) and
// with wsrelay-client over it, against a real node, through a proxy that reads the
// frames on the wire (tests/support/wiretap.mjs): what was agreed, which frames were
// compressed (RSV1), that what arrives is intact, and how a deflate bomb is closed.

import { test } from "node:test";
import assert from "node:assert/strict";
import { WebSocket } from "ws";
import { Relay } from "../src/index.js";
import { Processes, waitFor } from "../../../tests/support/processes.mjs";
import { wiretap } from "../../../tests/support/wiretap.mjs";

const AGREED = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/** ~1 KiB of market data: what compresses about 2x message by message. */
function ticker(seq) {
  return {
    type: "ticker", symbol: "BTC-USD", exchange: "coinbase", seq, bid: 67995.74 + seq, ask: 67995.88 + seq,
    trades: Array.from({ length: 8 }, (_, k) => ({
      trade_id: 629537871 + seq * 10 + k, price: 67995.91 + k / 100, size: 0.68916406 * (k + 1), side: k % 2 ? "buy" : "sell",
    })),
  };
}

/** A counter of the node's /metrics. */
async function metric(node, name) {
  const text = await (await fetch(`${node.url}/metrics`)).text();
  const line = text.split("\n").find((l) => l.startsWith(`${name} `));
  return line ? Number(line.split(" ")[1]) : 0;
}

/** `promise`, or a failure naming `what` after 10 s. */
function within(promise, what, ms = 10000) {
  let timer;
  const late = new Promise((_, reject) => { timer = setTimeout(() => reject(new Error(`no ${what} within ${ms} ms`)), ms); });
  return Promise.race([promise, late]).finally(() => clearTimeout(timer));
}

/** The next message of `ws`, parsed (within 10 s). */
const nextFrame = (ws) => within(new Promise((resolve, reject) => ws.once("message", (data) => {
  try { resolve(JSON.parse(data)); } catch (e) { reject(e); }
})), "message");

test("ws agrees permessage-deflate; large frames come compressed and intact, small ones plain", async (t) => {
  const p = new Processes();
  t.after(() => p.close());
  const node = await p.node("a", []);
  const tap = await wiretap(node.port);
  t.after(() => tap.close());
  // threshold 0: ws compresses everything it sends (its default is 1 KiB and up).
  const ws = new WebSocket(`${tap.url}?channel=feed`, "wsrelay.v1", { perMessageDeflate: { threshold: 0 } });
  t.after(() => ws.terminate());
  const welcome = nextFrame(ws);
  await within(new Promise((resolve, reject) => { ws.once("open", resolve); ws.once("error", reject); }), "open");
  assert.equal(ws.extensions, "permessage-deflate");
  assert.equal(tap.extensions(0), AGREED);
  assert.equal((await welcome).op, "welcome");

  const big = nextFrame(ws);
  await node.publish("feed", ticker(1));
  assert.deepEqual((await big).data, ticker(1));
  const small = nextFrame(ws);
  await node.publish("feed", { n: 1 });
  assert.deepEqual((await small).data, { n: 1 });
  const sent = tap.sent(0);
  assert.deepEqual(sent.map((f) => f.rsv1), [false, true, false], "welcome plain, ticker compressed, small plain");
  const text = JSON.stringify((await big));
  assert.ok(sent[1].length < text.length * 0.6, `${sent[1].length} B on the wire for ${text.length} B`);

  // Its own compressed publication is inflated by the node and delivered back.
  const ack = within(new Promise((resolve) => ws.on("message", (d) => { if (String(d).includes('"op":"ack"')) resolve(JSON.parse(d)); })), "ack");
  const echoed = nextFrame(ws);
  ws.send(JSON.stringify({ op: "pub", ch: "feed", data: ticker(2), id: 7 }));
  assert.deepEqual((await echoed).data, ticker(2));
  assert.deepEqual(await ack, { op: "ack", id: 7 });
  assert.equal(tap.received(0).at(-1).rsv1, true, "ws compressed it");
  assert.equal(await metric(node, "wsrelay_connections_deflate"), 1);
});

test("wsrelay-client over ws: compressed both ways, one compression per publication", async (t) => {
  const p = new Processes();
  t.after(() => p.close());
  const node = await p.node("a", ["--publish-rate", "1000", "--publish-burst", "1000"]);
  const tap = await wiretap(node.port);
  t.after(() => tap.close());
  const relays = [0, 1, 2].map(() => new Relay(tap.url, { WebSocket, minReconnectDelay: 50, requestTimeout: 3000 }));
  t.after(() => relays.forEach((r) => r.disconnect()));
  const subs = relays.map((r) => r.subscribe("room"));
  const subscribed = within(Promise.all(subs.map((s) => new Promise((resolve) => s.on("subscribed", resolve)))), "subscriptions");
  relays.forEach((r) => r.connect());
  await subscribed;
  await waitFor("three subscriptions", async () => tap.sockets().length === 3
    && tap.sockets().every((s) => s.toClient.frames.length >= 2));
  for (let i = 0; i < 3; i++) assert.equal(tap.extensions(i), AGREED);

  const before = await metric(node, "wsrelay_compressions_total");
  const got = subs.map((s) => new Promise((resolve) => s.on("message", resolve)));
  // ~2 KiB: over ws's own 1 KiB threshold, so the client compresses it too.
  const data = { a: ticker(3), b: ticker(4) };
  await relays[0].publish("room", data);
  for (const message of await within(Promise.all(got), "deliveries")) assert.deepEqual(message.data, data);
  assert.equal(await metric(node, "wsrelay_compressions_total") - before, 1, "once, for three subscribers");
  assert.ok(tap.received(0).some((f) => f.rsv1), "the client's publication went compressed");
  // Everything else (welcome, acks) is small and goes plain.
  for (let i = 0; i < 3; i++) assert.equal(tap.sent(i).filter((f) => f.rsv1).length, 1, `subscriber ${i}`);
});

test("a deflate bomb from ws is closed with 1009", async (t) => {
  const p = new Processes();
  t.after(() => p.close());
  const node = await p.node("a", []);
  const ws = new WebSocket(`ws://127.0.0.1:${node.port}/ws?channel=a`);
  t.after(() => ws.terminate());
  await nextFrame(ws);
  const closed = within(new Promise((resolve) => ws.once("close", (code) => resolve(code))), "close");
  // 16 MiB of one letter, ~16 KB compressed: under the 64 KiB bound on the wire.
  ws.send("a".repeat(16 << 20));
  assert.equal(await closed, 1009);
});
