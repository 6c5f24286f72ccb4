// What the client does with an application's backend behind the relay
// (docs/proxy.md): `rpc`, the backend's refusals, its close codes. The relay is a
// stand-in socket here: frames are handed to the client as the relay sends them.

import { test } from "node:test";
import assert from "node:assert/strict";
import { Relay, RelayError } from "../src/index.js";

/** A WebSocket that records what the client sends; the test plays the relay. */
class FakeSocket {
  static last = null;

  constructor(url, protocols) {
    this.url = url;
    this.protocols = protocols;
    this.sent = [];
    FakeSocket.last = this;
  }

  send(text) {
    this.sent.push(JSON.parse(text));
  }

  close() {}
}

/** A client connected to the stand-in: `welcome` received. */
function connected(t) {
  const relay = new Relay("ws://127.0.0.1:1/ws", { WebSocket: FakeSocket, requestTimeout: 3000 });
  t.after(() => relay.disconnect());
  relay.connect();
  const socket = FakeSocket.last;
  relay.handleFrame({ op: "welcome", node: "n1", conn: "1", channels: ["#alice"] });
  assert.equal(relay.state, "connected");
  return { relay, socket };
}

test("rpc sends the op and resolves with the answer's data", async (t) => {
  const { relay, socket } = connected(t);
  const answer = relay.rpc("history", { room: "chat:lobby" });
  const request = socket.sent.at(-1);
  assert.deepEqual(request, { op: "rpc", method: "history", data: { room: "chat:lobby" }, id: request.id });
  const lines = [{ id: 1, user: "alice", text: "hi", time: "2026-12-05T10:00:00Z" }];
  relay.handleFrame({ op: "rpc", id: request.id, data: { room: "chat:lobby", lines } });
  assert.deepEqual(await answer, { room: "chat:lobby", lines });

  // Without data: null, which JSON keeps (an absent field would not be sent).
  const bare = relay.rpc("ping");
  assert.equal(socket.sent.at(-1).data, null);
  relay.handleFrame({ op: "rpc", id: socket.sent.at(-1).id, data: "pong" });
  assert.equal(await bare, "pong");
});

test("a refusal of the backend rejects with its app code", async (t) => {
  const { relay, socket } = connected(t);
  const call = relay.rpc("nope", {});
  relay.handleFrame({ op: "error", id: socket.sent.at(-1).id, code: "refused", app_code: 4404, message: "no method 'nope'" });
  await assert.rejects(call, (e) => e instanceof RelayError && e.code === "refused" && e.appCode === 4404 && e.message === "no method 'nope'");

  const publish = relay.publish("chat:lobby", { text: "spam" });
  relay.handleFrame({ op: "error", id: socket.sent.at(-1).id, code: "refused", app_code: 4400, message: "not welcome" });
  await assert.rejects(publish, (e) => e.code === "refused" && e.appCode === 4400);

  // The relay's own errors have no app code.
  const other = relay.rpc("history", {});
  relay.handleFrame({ op: "error", id: socket.sent.at(-1).id, code: "unavailable", message: "the backend did not answer" });
  await assert.rejects(other, (e) => e.code === "unavailable" && e.appCode === null);
});

test("not connected, rpc rejects at once", async () => {
  const relay = new Relay("ws://127.0.0.1:1/ws", { WebSocket: FakeSocket });
  await assert.rejects(relay.rpc("history", {}), (e) => e.code === "disconnected");
});

test("a connection the backend refused or ended with 4000-4499 is not reconnected, with 4500-4999 it is", (t) => {
  for (const [code, reconnect] of [[4401, false], [4001, false], [4499, false], [4500, true], [4999, true]]) {
    const relay = new Relay("ws://127.0.0.1:1/ws", { WebSocket: FakeSocket, minReconnectDelay: 60000 });
    t.after(() => relay.disconnect());
    const errors = [];
    const closes = [];
    relay.on("error", (e) => errors.push(e));
    relay.on("disconnected", (e) => closes.push(e));
    relay.connect();
    // A refused connect: an `error` frame without id, then the close with the code.
    relay.handleFrame({ op: "error", code: "refused", app_code: code, message: "log in first" });
    FakeSocket.last.onclose({ code, reason: "log in first" });
    assert.equal(errors.length, 1);
    assert.equal(errors[0].appCode, code);
    assert.deepEqual(closes.map((c) => [c.code, c.reconnect]), [[code, reconnect]], `close ${code}`);
    assert.equal(relay.state, "disconnected");
  }
});

test("server-side subscriptions: welcome's, the API's, their messages, and the server's words at a close", (t) => {
  const { relay } = connected(t);
  const messages = [];
  const events = [];
  relay.on("message", (m) => messages.push(m));
  relay.on("subscribed", (e) => events.push(["subscribed", e.channel]));
  relay.on("unsubscribed", (e) => events.push(["unsubscribed", e.channel]));
  const room = relay.subscribe("chat:lobby");
  const roomMessages = [];
  room.on("message", (m) => roomMessages.push(m.data));
  // `#alice` came in welcome: its messages reach the relay's `message`.
  relay.handleFrame({ op: "msg", ch: "#alice", data: "for you" });
  relay.handleFrame({ op: "msg", ch: "chat:lobby", data: "hi room" });
  relay.handleFrame({ op: "msg", ch: "elsewhere", data: "not ours" });
  relay.handleFrame({ op: "subscribed", ch: "news", epoch: "e1", offset: 3 });
  relay.handleFrame({ op: "msg", ch: "news", data: "extra", offset: 4 });
  relay.handleFrame({ op: "unsubscribed", ch: "news" });
  relay.handleFrame({ op: "msg", ch: "news", data: "late" });
  assert.deepEqual(messages.map((m) => [m.channel, m.data]), [["#alice", "for you"], ["news", "extra"]]);
  assert.deepEqual(roomMessages, ["hi room"]);
  assert.deepEqual(events, [["subscribed", "news"], ["unsubscribed", "news"]]);
  // The server ends the connection: its reason, and no reconnect (4001).
  const closes = [];
  relay.on("disconnected", (e) => closes.push(e));
  relay.handleFrame({ op: "disconnect", code: 4001, reason: "kicked by a moderator" });
  FakeSocket.last.onclose({ code: 4001, reason: "closed by the application" });
  assert.deepEqual(closes.map((c) => [c.code, c.reason, c.reconnect]), [[4001, "kicked by a moderator", false]]);
});
