// The chat page as a newcomer meets it: it never fails silently. Each test drives
// the page in headless Chromium against a real node.

import { test } from "node:test";
import assert from "node:assert/strict";
import { Harness, lines, say, waitFor } from "./harness.mjs";

const status = (page) => page.textContent("#status");

async function open(h, node) {
  const page = await h.page();
  const notFound = [];
  page.on("response", (r) => { if (r.status() === 404) notFound.push(r.url()); });
  const sockets = [];
  page.on("websocket", (ws) => sockets.push(ws.url()));
  await page.goto(`${node.url}/`);
  await waitFor("connected", async () => (await status(page)).includes(`node ${node.id}`));
  return { page, notFound, sockets };
}

test("an invalid channel name is explained, and no connection is tried", async (t) => {
  const h = new Harness();
  t.after(() => h.close());
  const node = await h.node("a", []);
  const { page, sockets, notFound } = await open(h, node);
  const before = sockets.length;
  await page.fill("#channel", "my room");
  await page.click("#join");
  await waitFor("the rule", async () => (await page.textContent("#channel-error")).includes("A–Z a–z 0–9 _ . : @ -"));
  assert.match(await status(page), /invalid channel/);
  // Nothing loops: no connection was attempted for the bad name.
  await new Promise((r) => setTimeout(r, 700));
  assert.equal(sockets.length, before, sockets.join(", "));
  assert.deepEqual(notFound, [], "no 404 (the favicon is inline)");
});

test("sending after typing a new channel joins it first", async (t) => {
  const h = new Harness();
  t.after(() => h.close());
  const node = await h.node("a", []);
  const { page } = await open(h, node);
  const other = await open(h, node);
  await other.page.fill("#channel", "room2");
  await other.page.click("#join");
  await waitFor("other page on room2", async () => (await status(other.page)).includes("#room2"));

  await page.fill("#name", "ada");
  await page.fill("#channel", "room2");
  await say(page, "hello room2");
  await waitFor("the line on room2", async () => (await lines(other.page)).includes("ada: hello room2"));
  await waitFor("the page itself on room2", async () => (await status(page)).includes("#room2"));
  await waitFor("own line delivered", async () =>
    (await page.$$eval("#log p.own:not(.pending)", (ps) => ps.length)) === 1);
});

test("a line sent while disconnected waits, then goes out once", async (t) => {
  const h = new Harness();
  t.after(() => h.close());
  const redis = await h.redis();
  const history = ["--redis-url", redis.url, "--history-size", "100"];
  const a = await h.node("a", history);
  const b = await h.node("b", history);
  const { page } = await open(h, a);
  const watcher = await open(h, b);
  await page.fill("#name", "ada");

  await a.stop("SIGKILL");
  await waitFor("the page to notice", async () => (await status(page)).includes("connection lost"));
  assert.equal(await page.getAttribute("#status", "title"), "close code 1006");
  await say(page, "typed while offline");
  await waitFor("shown as waiting", async () =>
    (await page.$$eval("#log p.pending", (ps) => ps.length)) === 1);

  a.start();
  await a.ready();
  await waitFor("delivered to the other node", async () =>
    (await lines(watcher.page)).includes("ada: typed while offline"));
  await waitFor("no longer waiting", async () =>
    (await page.$$eval("#log p.pending", (ps) => ps.length)) === 0);
  const mine = (await lines(page)).filter((l) => l === "ada: typed while offline");
  assert.equal(mine.length, 1, "shown once");
  const seen = (await lines(watcher.page)).filter((l) => l === "ada: typed while offline");
  assert.equal(seen.length, 1, "sent once");
});

test("messages of any shape are readable, with times and own lines marked", async (t) => {
  const h = new Harness();
  t.after(() => h.close());
  const node = await h.node("a", []);
  const { page } = await open(h, node);
  await page.fill("#name", "ada");
  await node.publish("global", "hello from a terminal");
  await node.publish("global", { title: "deploy done", ok: true });
  await node.publish("global", 42);
  await say(page, "mine");
  await waitFor("all lines", async () => (await lines(page)).includes("ada: mine"));
  const got = (await lines(page)).filter((l) => !l.startsWith("joined"));
  assert.deepEqual(got, [
    "hello from a terminal",
    '{"title":"deploy done","ok":true}',
    "42",
    "ada: mine",
  ]);
  assert.ok(!got.some((l) => l.startsWith("?")), got.join(" | "));
  const times = await page.$$eval("#log p.msg time", (ts) => ts.map((t) => t.textContent));
  assert.ok(times.length === 4 && times.every((t) => /^\d\d:\d\d$/.test(t)), times.join(","));
  assert.equal(await page.$$eval("#log p.own", (ps) => ps.length), 1);
});

test("a node restart is said in words and reconnects at once", async (t) => {
  const h = new Harness();
  t.after(() => h.close());
  const redis = await h.redis();
  const a = await h.node("a", ["--redis-url", redis.url]);
  const { page } = await open(h, a);
  await a.stop("SIGTERM");
  // The cause stays shown while reconnect attempts fail.
  await waitFor("words for 1001", async () => (await status(page)).includes("the node is restarting"));
  await new Promise((r) => setTimeout(r, 300));
  assert.match(await status(page), /the node is restarting; reconnecting/);
  assert.equal(await page.getAttribute("#status", "title"), "close code 1001");
  a.start();
  await a.ready();
  await waitFor("back", async () => (await status(page)).includes("node a"));
});
