// The built-in chat page (GET /) in headless Chromium: it keeps its place in the
// channel's history and recovers across a node restart, and says so when it cannot.

import { test } from "node:test";
import assert from "node:assert/strict";
import { Harness, lines, say, waitFor } from "./harness.mjs";

test("a node restart under the page loses no chat line", async (t) => {
  const h = new Harness();
  t.after(() => h.close());
  const redis = await h.redis();
  const history = ["--redis-url", redis.url, "--history-size", "100"];
  const a = await h.node("a", history);
  const b = await h.node("b", history);

  const page = await h.page();
  await page.goto(`${a.url}/`);
  await waitFor("the page on node a", async () => (await page.textContent("#status")).includes("node a"));
  await page.fill("#name", "ada");
  await say(page, "before the restart");
  await waitFor("own line", async () => (await lines(page)).includes("ada: before the restart"));

  // Node a drains (the page gets 1001) and is gone while others keep talking.
  await a.stop("SIGTERM");
  await waitFor("the page to notice", async () => (await page.textContent("#status")).includes("disconnected"));
  for (let i = 1; i <= 3; i++) {
    await b.publish("global", { name: "bob", text: `while away ${i}` });
  }
  a.start();
  await a.ready();

  await waitFor("the missed lines", async () => (await lines(page)).includes("bob: while away 3"));
  await b.publish("global", { name: "bob", text: "live again" });
  await waitFor("live lines", async () => (await lines(page)).includes("bob: live again"));
  const chat = (await lines(page)).filter((l) => l.includes(": "));
  assert.deepEqual(chat, [
    "ada: before the restart",
    "bob: while away 1",
    "bob: while away 2",
    "bob: while away 3",
    "bob: live again",
  ]);
  assert.ok(!(await lines(page)).some((l) => l.includes("could not")), "everything was recovered");
});

test("lost history is shown, not hidden", async (t) => {
  const h = new Harness();
  t.after(() => h.close());
  const redis = await h.redis();
  const a = await h.node("a", ["--redis-url", redis.url, "--history-size", "100"]);
  const page = await h.page();
  await page.goto(`${a.url}/`);
  await waitFor("the page on node a", async () => (await page.textContent("#status")).includes("node a"));
  await a.publish("global", { name: "bob", text: "first" });
  await waitFor("first line", async () => (await lines(page)).includes("bob: first"));

  // Redis restarts without its data: the channel's history starts a new epoch.
  await redis.stop();
  redis.start();
  await redis.ready();
  await waitFor("a notice", async () => (await lines(page)).some((l) => l.includes("could not be delivered")));
  await a.ready();
  await waitFor("publish after the restart", () => a.publish("global", { name: "bob", text: "after" }).then(() => true));
  await waitFor("the next line", async () => (await lines(page)).includes("bob: after"));
});

test("the page shows who is in the room, and on which node", async (t) => {
  const h = new Harness();
  t.after(() => h.close());
  const redis = await h.redis();
  const args = ["--redis-url", redis.url, "--presence", "--join-leave"];
  const a = await h.node("a", args);
  const b = await h.node("b", args);
  const roster = (page) => page.$$eval("#roster li", (lis) => lis.map((li) => li.textContent));

  const first = await h.page();
  await first.goto(`${a.url}/`);
  await waitFor("own entry", async () => (await roster(first)).join() === "guest · node a (you)");
  const second = await h.page();
  await second.goto(`${b.url}/`);
  await waitFor("the newcomer, by its join", async () =>
    (await roster(first)).sort().join("|") === "guest · node a (you)|guest · node b");
  await waitFor("both, by presence", async () => (await roster(second)).length === 2);
  assert.equal(await first.textContent("#count"), "2");
  await second.close();
  await waitFor("the leave", async () => (await roster(first)).join() === "guest · node a (you)");

  // Without presence on the channel, no roster is shown.
  const plain = await h.node("p", ["--redis-url", redis.url]);
  const third = await h.page();
  await third.goto(`${plain.url}/`);
  await waitFor("connected", async () => (await third.textContent("#status")).includes("node p"));
  await waitFor("no roster", async () => await third.$eval("#people", (p) => p.hidden));
});
