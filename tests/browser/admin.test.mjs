// The operator's page (GET /admin) in headless Chromium against a three-node cluster.

import { test } from "node:test";
import assert from "node:assert/strict";
import { API_KEY, Harness, waitFor } from "./harness.mjs";

const nodeIds = (page) => page.$$eval("#nodes tr", (rows) => rows.map((r) => r.dataset.node));

test("the admin page shows the cluster, and a killed node leaves it", async (t) => {
  const h = new Harness();
  t.after(() => h.close());
  const redis = await h.redis();
  const args = ["--redis-url", redis.url, "--node-ttl", "1500ms", "--presence"];
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

  // A client on c, then c killed: it leaves the table once its announcement expires.
  const chat = await h.page();
  await chat.goto(`${c.url}/`);
  await waitFor("the chat page on c", async () => (await chat.textContent("#status")).includes("node c"));
  await waitFor("c's connection counted", async () =>
    (await page.$eval('#nodes tr[data-node="c"] td:nth-child(4)', (td) => td.textContent)) === "1");
  await waitFor("the busiest channel", async () =>
    (await page.$$eval("#channels tr", (rows) => rows.map((r) => r.textContent))).includes("global1"));
  await page.fill("#presence-ch", "global");
  await page.click("#presence-form button");
  await waitFor("presence on demand", async () => (await page.textContent("#presence")).includes("on c"));

  await c.stop("SIGKILL");
  await waitFor("c gone", async () => (await nodeIds(page)).join() === "a,b");

  // The publish form.
  await page.fill("#pub-ch", "news");
  await page.fill("#pub-data", '{"text":"test"}');
  await page.click("#publish-form button");
  await waitFor("published", async () => (await page.textContent("#pub-result")) === "published 1");
});
