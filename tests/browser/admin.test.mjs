// The operator's page (GET /admin) in headless Chromium against real node processes
// and redis-servers: the cluster, a SIGKILLed node said silent and left out of the
// totals, a shard killed under the page, the charts, and a channel's page.

import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { API_KEY, Harness, waitFor } from "./harness.mjs";

const nodeIds = (page) => page.$$eval("#nodes tr", (rows) => rows.map((r) => r.dataset.node));
const rowText = (page, id, cls) =>
  page.$eval(`#nodes tr[data-node="${id}"] td.${cls}`, (td) => td.textContent);
const connections = (page, id) =>
  page.$eval(`#nodes tr[data-node="${id}"] td:nth-child(5)`, (td) => td.textContent);
const series = (page, chart, name) =>
  page.$eval(`#chart-${chart} polyline[data-series="${name}"]`, (l) => ({
    points: Number(l.dataset.points), last: Number(l.dataset.last), max: Number(l.dataset.max),
  }));

async function login(page, url) {
  await page.goto(url);
  await page.fill("#key", API_KEY);
  await page.click("#login button");
}

/** A WebSocket client of `node`, subscribed to `query`'s channels, held by a page. */
async function client(h, node, query) {
  const page = await h.page();
  await page.goto(`${node.url}/healthz`);
  await page.evaluate((url) => new Promise((resolve, reject) => {
    const ws = new WebSocket(url);
    window.ws = ws;
    ws.onmessage = (e) => { if (JSON.parse(e.data).op === "welcome") resolve(); };
    ws.onerror = () => reject(new Error("websocket failed"));
  }), `ws://127.0.0.1:${node.port}/ws?${query}`);
  return page;
}

test("the admin page says a SIGKILLed node is silent and leaves it out of the totals", async (t) => {
  const h = new Harness();
  t.after(() => h.close());
  const redis = await h.redis();
  // Announcements every second: silent after 2 s, gone after 6 s.
  const args = ["--redis-url", redis.url, "--node-ttl", "6s", "--presence"];
  const a = await h.node("a", args);
  await h.node("b", args);
  const c = await h.node("c", args);

  const page = await h.page();
  await page.goto(`${a.url}/admin`);
  // A wrong key is said, not ignored.
  await page.fill("#key", "wrong-key-0123456789");
  await page.click("#login button");
  await waitFor("the refusal", async () => (await page.textContent("#error")).includes("wrong API key"));

  await page.fill("#key", API_KEY);
  await page.click("#login button");
  await waitFor("three nodes", async () => (await nodeIds(page)).join() === "a,b,c");
  assert.equal(await page.textContent("#error"), "");
  assert.match(await rowText(page, "a", "heard"), /^\d+\.\d s ago$/);

  // A chat client on a and one on c; then c killed.
  for (const node of [a, c]) {
    const chat = await h.page();
    await chat.goto(`${node.url}/`);
    await waitFor(`the chat page on ${node.id}`, async () =>
      (await chat.textContent("#status")).includes(`node ${node.id}`));
  }
  await waitFor("c's connection counted", async () => (await connections(page, "c")) === "1");
  await waitFor("both connections in the totals", async () =>
    (await page.textContent("#summary")).includes("3 node(s), 3 ready · 2 connections"));
  await waitFor("the busiest channel", async () =>
    (await page.$$eval("#channels tr", (rows) => rows.map((r) => r.textContent))).includes("global2"));
  await page.fill("#presence-ch", "global");
  await page.click("#presence-form button");
  await waitFor("presence on demand", async () => (await page.textContent("#presence")).includes("on c"));

  await c.stop("SIGKILL");
  const killed = Date.now();
  await waitFor("c said silent", async () => (await rowText(page, "c", "state")) === "not heard from");
  // Two intervals (2 s) after its last announcement, which came before the kill,
  // plus one refresh of the page (1 s here) and some slack for a loaded machine.
  const took = Date.now() - killed;
  assert.ok(took < 4000, `c silent after ${took} ms`);
  assert.equal(await page.$eval('#nodes tr[data-node="c"]', (tr) => tr.dataset.state), "silent");
  // Still listed (its announcement has not expired), but out of the totals.
  assert.deepEqual(await nodeIds(page), ["a", "b", "c"]);
  await waitFor("the totals without c", async () => {
    const summary = await page.textContent("#summary");
    return summary.includes("1 not heard from, left out of the totals: c") &&
      summary.includes("· 1 connections");
  });
  await waitFor("the channels without c's subscriber", async () =>
    (await page.$$eval("#channels tr", (rows) => rows.map((r) => r.textContent))).includes("global1"));
  assert.match(await page.textContent("#channels-note"), /left out: c/);
  // The cluster's connections chart follows the same rule.
  await waitFor("the cluster line without c", async () =>
    (await series(page, "connections", "cluster")).last === 1);
  assert.ok((await series(page, "connections", "c")).points >= 2, "c's own line stays, ended");
  assert.match(await rowText(page, "c", "heard"), /s ago$/);

  await waitFor("c gone", async () => (await nodeIds(page)).join() === "a,b");
  await waitFor("nothing left out", async () => !(await page.textContent("#summary")).includes("not heard"));

  // The publish form.
  await page.fill("#pub-ch", "news");
  await page.fill("#pub-data", '{"text":"test"}');
  await page.click("#publish-form button");
  await waitFor("published", async () => (await page.textContent("#pub-result")) === "published 1");
});

test("the charts draw each node and the cluster, and grow", async (t) => {
  const h = new Harness();
  t.after(() => h.close());
  const redis = await h.redis();
  const args = ["--redis-url", redis.url, "--node-ttl", "1500ms"];
  const a = await h.node("a", args);
  const b = await h.node("b", args);
  await client(h, a, "channel=news");
  await client(h, b, "channel=news");

  const page = await h.page();
  await login(page, `${a.url}/admin`);
  for (const chart of ["connections", "published", "delivered"]) {
    for (const name of ["a", "b", "cluster"]) {
      await waitFor(`${chart}: ${name}'s line`, async () => (await series(page, chart, name)).points >= 2);
    }
  }
  await waitFor("two connections in the cluster line", async () =>
    (await series(page, "connections", "cluster")).last === 2);
  const before = (await series(page, "connections", "a")).points;
  await waitFor("a's line growing", async () => (await series(page, "connections", "a")).points > before + 2);

  // Traffic shows up as a rate.
  await waitFor("published/s and delivered/s above 0", async () => {
    await a.publish("news", { n: 1 });
    const [published, delivered] = [await series(page, "published", "cluster"),
      await series(page, "delivered", "cluster")];
    return published.max > 0 && delivered.max > 0;
  });

  // A page opened later starts from the nodes' history, not from nothing.
  const later = await h.page();
  await login(later, `${b.url}/admin`);
  await waitFor("the history on a new page", async () => (await series(later, "connections", "a")).points >= before);
  assert.equal(await later.$$eval("svg.chart", (charts) => charts.length), 3);
  assert.equal(await later.$$eval("script[src], link[rel=stylesheet]", (els) => els.length), 0,
    "nothing loaded from elsewhere: the page works offline");
});

test("the admin page shows each Redis shard and a shard killed under it", async (t) => {
  const h = new Harness();
  t.after(() => h.close());
  const first = await h.redis();
  const second = await h.redis();
  const args = ["--redis-url", `${first.url},${second.url}`, "--node-ttl", "3s", "--broker-timeout", "500ms"];
  const a = await h.node("a", args);
  await h.node("b", args);
  const page = await h.page();
  await login(page, `${a.url}/admin`);

  const shards = (id) => page.$$eval(`#nodes tr[data-node="${id}"] .shard`, (spans) =>
    spans.map((s) => ({ shard: s.dataset.shard, state: s.dataset.state, text: s.textContent })));
  const label = (r) => r.url.replace("redis://", "");
  for (const id of ["a", "b"]) {
    await waitFor(`${id}: both shards up with a round trip`, async () => {
      const list = await shards(id);
      return list.length === 2 && list.every((s) => s.state === "up" && / ms$/.test(s.text));
    });
  }
  assert.deepEqual((await shards("a")).map((s) => s.shard), [label(first), label(second)]);

  // The second shard killed (the first holds the cluster view).
  await second.stop("SIGKILL");
  for (const id of ["a", "b"]) {
    await waitFor(`${id}: the second shard down`, async () => {
      const [one, two] = await shards(id);
      return one.state === "up" && two.state === "down" && two.text.startsWith(`${label(second)} down (`);
    });
  }
  // Ready all the same (`--ready-requires any-shard`).
  assert.equal(await rowText(page, "a", "state"), "ready (redis)");
});

test("a channel's page: subscribers by node, history, presence", async (t) => {
  const h = new Harness();
  t.after(() => h.close());
  const dir = mkdtempSync(join(tmpdir(), "wsrelay-admin-"));
  const config = join(dir, "wsrelay.toml");
  writeFileSync(config, "[namespaces.room]\nhistory-size = 20\nhistory-ttl = \"10m\"\npresence = true\n");
  const redis = await h.redis();
  const args = ["--redis-url", redis.url, "--node-ttl", "1500ms", "--config", config];
  const a = await h.node("a", args);
  const b = await h.node("b", args);
  await client(h, a, "channel=room:1");
  await client(h, b, "channel=room:1");
  await client(h, b, "channel=room:1");
  for (let i = 1; i <= 3; i++) await a.publish("room:1", { text: `hello ${i}` });

  // From the channels table.
  const page = await h.page();
  await login(page, `${a.url}/admin`);
  await waitFor("room:1 in the channels table", async () =>
    (await page.$$eval("#channels tr", (rows) => rows.map((r) => r.textContent))).includes("room:13"));
  await page.click('#channels tr[data-ch="room:1"] a');
  assert.equal(new URL(page.url()).hash, "#channel=room%3A1");
  await waitFor("the channel's view", async () => (await page.textContent("#ch-name")) === "room:1");
  assert.ok(await page.$eval("#cluster-view", (el) => el.hidden));
  await waitFor("subscribers by node", async () => {
    const rows = await page.$$eval("#ch-nodes tr", (trs) => trs.map((tr) => tr.textContent));
    return rows.join("|") === "aready1|bready2";
  });
  assert.match(await page.textContent("#ch-subscribers"), /^3 subscriber/);
  await waitFor("its history", async () => /^epoch \S+, top offset 3; the last 3 message/.test(
    await page.textContent("#ch-history")));
  const messages = await page.$$eval("#ch-messages tr", (trs) => trs.map((tr) => tr.textContent));
  assert.deepEqual(messages, ['3{"text":"hello 3"}', '2{"text":"hello 2"}', '1{"text":"hello 1"}']);
  await waitFor("its presence", async () => (await page.textContent("#ch-presence")).startsWith("3 client(s)"));

  // By address: a channel without history or presence, then a bad name.
  const other = await h.page();
  await login(other, `${b.url}/admin#channel=global`);
  await waitFor("no history said", async () =>
    (await other.textContent("#ch-history")).startsWith("no history: this channel keeps none"));
  assert.equal(await other.textContent("#ch-subscribers"), "no subscribers on any node");
  assert.match(await other.textContent("#ch-presence"), /^no presence: this channel keeps none/);
  await other.goto(`${b.url}/admin#channel=${encodeURIComponent("bad name!")}`);
  await other.fill("#key", API_KEY);
  await other.click("#login button");
  await waitFor("a bad name said", async () =>
    (await other.textContent("#ch-error")).startsWith('cannot read channel "bad name!": channel'));
  // Back to the cluster.
  await other.click('#channel-view a[href="#"]');
  await waitFor("the cluster again", async () => !(await other.$eval("#cluster-view", (el) => el.hidden)));
});
