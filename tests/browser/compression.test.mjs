// permessage-deflate with Chromium: the chat page's connection agrees on it, the
// node's large frames reach the page compressed (RSV1 on the wire, read through a
// proxy: tests/support/wiretap.mjs) and intact, and what Chromium compresses itself
// is inflated by the node.

import { test } from "node:test";
import assert from "node:assert/strict";
import { Harness, lines, say, waitFor } from "./harness.mjs";
import { wiretap } from "../support/wiretap.mjs";

const AGREED = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

test("the page's connection is compressed both ways and every line arrives intact", async (t) => {
  const h = new Harness();
  t.after(() => h.close());
  const node = await h.node("a", []);
  const tap = await wiretap(node.port);
  t.after(() => tap.close());

  const reader = await h.page();
  await reader.goto(`${tap.http}/`);
  await waitFor("the reader connected", async () => (await reader.textContent("#status")).includes("node a"));
  const writer = await h.page();
  await writer.goto(`${tap.http}/`);
  await waitFor("the writer connected", async () => (await writer.textContent("#status")).includes("node a"));
  assert.equal(tap.sockets().length, 2);
  for (const i of [0, 1]) assert.equal(tap.extensions(i), AGREED, `socket ${i}`);
  // What Chromium itself reports for a socket of the page.
  const extensions = await reader.evaluate((url) => new Promise((resolve, reject) => {
    const ws = new WebSocket(url);
    ws.onopen = () => { resolve(ws.extensions); ws.close(); };
    ws.onerror = () => reject(new Error("no connection"));
  }), `${tap.url}?channel=probe`);
  assert.equal(extensions, AGREED);

  // A long line typed in one page: Chromium compresses its message, the node
  // inflates it, and sends the frame (over the threshold) compressed to both.
  const long = Array.from({ length: 40 }, (_, i) => `word${i % 7} of a long line`).join(" ");
  await writer.fill("#name", "ada");
  await say(writer, long);
  await waitFor("the long line in the reader", async () => (await lines(reader)).includes(`ada: ${long}`));
  assert.ok(tap.received(1).some((f) => f.rsv1), "Chromium sent its line compressed");

  // A publication of ~1 KiB from the server API.
  const text = Array.from({ length: 60 }, (_, i) => `tick ${i}: 67995.${i}`).join(", ");
  await node.publish("global", { name: "feed", text });
  await waitFor("the publication in the reader", async () => (await lines(reader)).includes(`feed: ${text}`));
  const compressed = tap.sent(0).filter((f) => f.rsv1);
  assert.equal(compressed.length, 2, "the long line and the publication, compressed");
  assert.ok(compressed[1].length < text.length / 2, `${compressed[1].length} B on the wire`);
  assert.ok(tap.sent(0).some((f) => !f.rsv1), "small frames (welcome, acks) go plain");
});
