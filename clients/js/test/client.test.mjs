// wsrelay-client against real wsrelay nodes and a real redis-server (started by
// the tests on free loopback ports), with `ws` as the WebSocket of Node.js.

import { test } from "node:test";
import assert from "node:assert/strict";
import { createHmac } from "node:crypto";
import { readFileSync, writeFileSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import { WebSocket } from "ws";
import { Relay, RelayError } from "../src/index.js";
import { Processes, freePort, waitFor } from "../../../tests/support/processes.mjs";

const options = { WebSocket, minReconnectDelay: 50, maxReconnectDelay: 500, requestTimeout: 3000 };

/** A config file giving `chat:*` history (and presence). */
function chatConfig() {
  const path = `${tmpdir()}/wsrelay-js-${process.pid}-${Math.random().toString(36).slice(2)}.toml`;
  writeFileSync(path, "[namespaces.chat]\nhistory-size = 1000\npresence = true\njoin-leave = true\n");
  return ["--config", path, "--publish-rate", "100000", "--publish-burst", "100000"];
}

/** Resolves with the next `event` of `emitter` (within 10 s). */
function next(emitter, event, ms = 10000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no ${event} within ${ms} ms`)), ms);
    const off = emitter.on(event, (value) => {
      clearTimeout(timer);
      off();
      resolve(value);
    });
  });
}

/** A TCP proxy standing for a load balancer: new connections go to `target`. */
async function balancer(target) {
  const port = await freePort();
  const server = net.createServer((client) => {
    const upstream = net.connect(target, "127.0.0.1");
    client.pipe(upstream).pipe(client);
    client.on("error", () => upstream.destroy());
    upstream.on("error", () => client.destroy());
  });
  await new Promise((r) => server.listen(port, "127.0.0.1", r));
  return {
    url: `ws://127.0.0.1:${port}/ws`,
    sendTo(port) { target = port; },
    close() { server.close(); },
  };
}

test("the golden frames are understood", () => {
  const examples = JSON.parse(readFileSync(new URL("../../../docs/protocol/examples.json", import.meta.url)));
  class Dummy { constructor() {} send() {} close() {} }
  const relay = new Relay("ws://127.0.0.1:1/ws", { WebSocket: Dummy });
  const sub = relay.subscribe("chat:1");
  const seen = [];
  for (const event of ["message", "gap", "join", "leave"]) sub.on(event, (v) => seen.push([event, v]));
  for (const { frame } of examples.server) relay.handleFrame(frame);
  assert.equal(relay.node, "n1", "welcome");
  assert.deepEqual(seen.map(([e]) => e), ["message", "message", "gap", "join", "leave"]);
  assert.deepEqual(seen[0][1], { data: { text: "hi" }, offset: 42, from: null });
  assert.deepEqual(seen[1][1], { data: "hello", offset: 43, from: "user-42" });
  assert.deepEqual(seen[2][1], { epoch: "p2m4", offset: 57 });
  assert.equal(seen[3][1].user, "user-42");
  // Every client frame is one the client can send.
  for (const { frame } of examples.client) assert.ok(["sub", "unsub", "pub", "history", "presence", "presence_stats", "ping", "rpc"].includes(frame.op));
});

test("publish, subscribe, acks, history, presence and typed errors", async (t) => {
  const p = new Processes();
  t.after(() => p.close());
  const node = await p.node("a", chatConfig());
  const relay = new Relay(`ws://127.0.0.1:${node.port}/ws`, options);
  t.after(() => relay.disconnect());
  const connected = next(relay, "connected");
  relay.connect();
  assert.equal((await connected).node, "a");

  const sub = relay.subscribe("chat:1");
  const subscribed = await next(sub, "subscribed");
  assert.equal(subscribed.offset, 0);
  assert.equal(typeof subscribed.epoch, "string");
  const got = next(sub, "message");
  assert.deepEqual(await sub.publish({ text: "hi" }), { offset: 1 });
  assert.deepEqual(await got, { data: { text: "hi" }, offset: 1, from: null });
  assert.equal(sub.offset, 1);

  const history = await sub.history({ limit: 10 });
  assert.deepEqual(history.messages, [{ offset: 1, data: { text: "hi" } }]);
  const presence = await sub.presence();
  assert.equal(presence.length, 1);
  assert.equal(presence[0].node, "a");
  assert.deepEqual(await sub.presenceStats(), { clients: 1, users: 1 });

  // Plain channels: no offset.
  assert.deepEqual(await relay.publish("room", 1), { offset: null });
  for (const [channel, code] of [["bad name", "invalid_channel"]]) {
    await assert.rejects(relay.publish(channel, 1), (e) => e instanceof RelayError && e.code === code);
  }
  const plain = relay.subscribe("room");
  await next(plain, "subscribed");
  await assert.rejects(plain.history(), (e) => e.code === "bad_request");
  await sub.unsubscribe();
  assert.equal(sub.state, "unsubscribed");
});

test("an expired token is refreshed and the subscription restored", async (t) => {
  const secret = "test-secret-of-some-length";
  const p = new Processes();
  t.after(() => p.close());
  const node = await p.node("a", ["--jwt-secret", secret, "--jwt-leeway", "0s"]);
  let issued = 0;
  const getToken = () => {
    issued++;
    return hs256({ sub: "ada", exp: Math.floor(Date.now() / 1000) + 2, channels: ["room"], publish: ["room"] }, secret);
  };
  const relay = new Relay(`ws://127.0.0.1:${node.port}/ws`, { ...options, getToken });
  t.after(() => relay.disconnect());
  relay.connect();
  const sub = relay.subscribe("room");
  await next(sub, "subscribed");
  const closed = await next(relay, "disconnected", 10000);
  assert.equal(closed.code, 1008);
  assert.equal(closed.reconnect, true);
  await next(sub, "subscribed");
  assert.ok(issued >= 2, `${issued} tokens`);
  await assert.rejects(relay.publish("elsewhere", 1), (e) => e.code === "forbidden");
});

test("after a drain the client reconnects to another node and recovers without gap or duplicate", async (t) => {
  const p = new Processes();
  t.after(() => p.close());
  const redis = await p.redis();
  const flags = ["--redis-url", redis.url, ...chatConfig()];
  const a = await p.node("a", flags);
  const b = await p.node("b", flags);
  const lb = await balancer(a.port);
  t.after(() => lb.close());

  const relay = new Relay(lb.url, options);
  t.after(() => relay.disconnect());
  relay.connect();
  assert.equal((await next(relay, "connected")).node, "a");
  const sub = relay.subscribe("chat:race");
  await next(sub, "subscribed");
  const offsets = [];
  sub.on("message", (m) => offsets.push(m.offset));
  const gaps = [];
  sub.on("gap", (g) => gaps.push(g));

  // A publisher on node b keeps publishing throughout.
  let publishing = true;
  const publisher = (async () => {
    let n = 0;
    while (publishing) {
      await b.publish("chat:race", ++n);
    }
    return n;
  })();
  await waitFor("some messages", async () => offsets.length >= 20);
  lb.sendTo(b.port);
  const reconnected = next(relay, "connected");
  await a.stop("SIGTERM");
  assert.equal((await reconnected).node, "b");
  await waitFor("more messages after the move", async () => offsets.length >= 60);
  publishing = false;
  const published = await publisher;
  await waitFor("every message", async () => offsets.at(-1) === published);
  assert.deepEqual(offsets, Array.from({ length: published }, (_, i) => i + 1), "consecutive, each once");
  assert.deepEqual(gaps, []);
});

test("a Redis that lost its data is reported as a gap", async (t) => {
  const p = new Processes();
  t.after(() => p.close());
  const redis = await p.redis();
  const node = await p.node("a", ["--redis-url", redis.url, ...chatConfig()]);
  const relay = new Relay(`ws://127.0.0.1:${node.port}/ws`, options);
  t.after(() => relay.disconnect());
  relay.connect();
  const sub = relay.subscribe("chat:lost");
  await next(sub, "subscribed");
  await sub.publish("before");
  const epoch = sub.epoch;
  const gap = next(sub, "gap");
  await redis.stop();
  redis.start();
  await redis.ready();
  const { epoch: now } = await gap;
  assert.notEqual(now, epoch);
  assert.equal(sub.epoch, now);
});

/** An HS256 JWT. */
function hs256(claims, secret) {
  const b64 = (v) => Buffer.from(JSON.stringify(v)).toString("base64url");
  const body = `${b64({ alg: "HS256", typ: "JWT" })}.${b64(claims)}`;
  return `${body}.${createHmac("sha256", secret).update(body).digest("base64url")}`;
}

/** A WebSocket that never opens, as behind a proxy that breaks upgrades. */
class BrokenWebSocket {
  constructor() {
    setTimeout(() => this.onclose?.({ code: 1006, reason: "" }), 5);
  }
  send() {}
  close() {}
}

test("without WebSocket the client falls back to HTTP streaming, requests go to any node, and a drain loses nothing", async (t) => {
  const p = new Processes();
  t.after(() => p.close());
  const redis = await p.redis();
  const flags = ["--redis-url", redis.url, ...chatConfig()];
  const a = await p.node("a", flags);
  const b = await p.node("b", flags);
  const lb = await balancer(a.port);
  t.after(() => lb.close());

  const relay = new Relay(lb.url, { ...options, WebSocket: BrokenWebSocket, transports: ["websocket", "stream"] });
  t.after(() => relay.disconnect());
  relay.connect();
  const connected = await next(relay, "connected");
  assert.deepEqual([connected.node, connected.transport, relay.transport], ["a", "stream", "stream"]);
  const sub = relay.subscribe("chat:fallback");
  await next(sub, "subscribed");
  const offsets = [];
  sub.on("message", (m) => offsets.push(m.offset));
  const gaps = [];
  sub.on("gap", (g) => gaps.push(g));

  // Requests now reach node b, which forwards them to the session on a.
  lb.sendTo(b.port);
  assert.deepEqual(await sub.publish("through b"), { offset: 1 });
  await waitFor("its own message", async () => offsets.length === 1);

  let publishing = true;
  const publisher = (async () => {
    let n = 1;
    while (publishing) {
      await b.publish("chat:fallback", ++n);
    }
    return n;
  })();
  await waitFor("some messages", async () => offsets.length >= 20);
  const reconnected = next(relay, "connected");
  await a.stop("SIGTERM");
  const again = await reconnected;
  assert.deepEqual([again.node, again.transport], ["b", "stream"]);
  await waitFor("more messages after the move", async () => offsets.length >= 60);
  publishing = false;
  const published = await publisher;
  await waitFor("every message", async () => offsets.at(-1) === published);
  assert.deepEqual(offsets, Array.from({ length: published }, (_, i) => i + 1), "consecutive, each once");
  assert.deepEqual(gaps, []);
});
