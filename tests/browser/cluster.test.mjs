// Two chat pages through the local cluster (scripts/local-cluster.sh: Redis, three
// nodes, nginx from the deployment's template): the node under one page drains, the
// page reconnects through the load balancer to another node and shows every line.

import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { readdirSync, readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { Harness, lines, say, waitFor } from "./harness.mjs";
import { WSRELAY_BIN, freePort } from "../support/processes.mjs";

const root = fileURLToPath(new URL("../../", import.meta.url));

/** The pid of the node process listening on `port` (its address is in its environment). */
function nodePid(port) {
  for (const pid of readdirSync("/proc").filter((p) => /^\d+$/.test(p))) {
    try {
      const env = readFileSync(`/proc/${pid}/environ`, "latin1");
      if (env.includes(`WSRELAY_LISTEN=127.0.0.1:${port}\0`) && readFileSync(`/proc/${pid}/cmdline`, "latin1").includes("wsrelay")) {
        return Number(pid);
      }
    } catch {
      // Gone, or not ours.
    }
  }
  throw new Error(`no node on port ${port}`);
}

test("a drained node under a page loses no line behind the load balancer", async (t) => {
  await drainUnderAPage(t, { noWebSocket: false });
});

// A proxy that breaks WebSocket upgrades (nginx refuses them here): the pages fall
// back to SSE, say so, and chat on; requests go to whichever node the balancer
// picks and reach the session's node through Redis.
test("behind a proxy that refuses WebSockets the page chats over SSE and survives a drain", async (t) => {
  await drainUnderAPage(t, { noWebSocket: true });
});

/** Starts the local cluster (scripts/local-cluster.sh: Redis, three nodes, nginx)
 *  for the test `t`; its balancer's port and the nodes' ports. */
async function localCluster(t, { noWebSocket = false } = {}) {
  const lb = await freePort();
  const nodes = [await freePort(), await freePort(), await freePort()];
  const cluster = spawn("bash", [`${root}scripts/local-cluster.sh`], {
    env: {
      ...process.env,
      PATH: `${process.env.PATH}:/usr/sbin`,
      LB_PORT: String(lb),
      REDIS_PORT: String(await freePort()),
      NODE_PORTS: nodes.join(" "),
      WSRELAY_BIN,
      NO_WEBSOCKET: noWebSocket ? "1" : "",
    },
    stdio: ["ignore", "pipe", "inherit"],
  });
  const exited = new Promise((r) => cluster.once("exit", r));
  t.after(async () => {
    cluster.kill("SIGTERM");
    await exited;
  });
  let output = "";
  cluster.stdout.on("data", (d) => { output += d; });
  await waitFor("the local cluster", async () => output.includes("ready:"), 30000);
  return { lb, nodes };
}

async function drainUnderAPage(t, { noWebSocket }) {
  const { lb, nodes } = await localCluster(t, { noWebSocket });

  const h = new Harness();
  t.after(() => h.close());
  const status = (page) => page.textContent("#status");
  const onNode = async (page) => (await status(page)).match(/node (node\d)/)?.[1];
  const first = await h.page();
  await first.goto(`http://127.0.0.1:${lb}/`);
  await waitFor("first page connected", async () => (await onNode(first)) !== undefined);
  // The second page must be on another node than the first (the balancer sends a
  // new connection to the least loaded node; reload until it does).
  const second = await h.page();
  await second.goto(`http://127.0.0.1:${lb}/`);
  await waitFor("second page on another node", async () => {
    const [a, b] = [await onNode(first), await onNode(second)];
    if (b === undefined) return false;
    if (a === b) {
      await second.reload();
      return false;
    }
    return true;
  });
  for (const page of [first, second]) {
    const via = (await status(page)).includes("via SSE");
    assert.equal(via, noWebSocket, await status(page));
  }
  await first.fill("#name", "ada");
  await second.fill("#name", "bob");

  await say(first, "one");
  await say(second, "two");
  await waitFor("both lines on the first page", async () => (await lines(first)).includes("bob: two"));

  // The first page's node drains; the second page keeps talking meanwhile.
  const node = await onNode(first);
  const port = nodes[Number(node.slice(4)) - 1];
  process.kill(nodePid(port), "SIGTERM");
  for (const text of ["three", "four", "five"]) await say(second, text);
  // Bob's lines are published (his page shows them back) before Ada's next one:
  // the order asserted below is the order they were published in.
  await waitFor("the second page's lines published", async () => (await lines(second)).includes("bob: five"));
  await waitFor("the first page on another node", async () => {
    const now = await onNode(first);
    return now !== undefined && now !== node && !(await status(first)).includes("disconnected");
  });
  await say(first, "six");
  await waitFor("every line", async () => (await lines(first)).includes("ada: six"));
  await waitFor("the second page too", async () => (await lines(second)).includes("ada: six"));
  const chat = (await lines(first)).filter((l) => l.includes(": "));
  assert.deepEqual(chat, ["ada: one", "bob: two", "bob: three", "bob: four", "bob: five", "ada: six"]);
  assert.ok(!(await lines(first)).some((l) => l.includes("could not")), "everything recovered");
  assert.equal((await status(first)).includes("via SSE"), noWebSocket, await status(first));
  if (noWebSocket) {
    // The balancer spread the pages' requests: some reached a node that did not
    // hold the session and went on through Redis.
    let forwarded = 0;
    for (const p of nodes.filter((p) => p !== port)) {
      const text = await (await fetch(`http://127.0.0.1:${p}/metrics`)).text();
      const m = text.match(/^wsrelay_stream_requests_total\{route="forwarded"\} (\d+)/m);
      forwarded += Number(m?.[1] ?? 0);
    }
    assert.ok(forwarded > 0, "no request was forwarded between nodes");
  }
}

// A page with nothing but a browser's own EventSource (no library): when the node
// under it drains, EventSource reconnects by itself through the balancer with
// Last-Event-ID, and the node it reaches replays what the page missed.
test("a bare EventSource recovers across a drain by itself, from Last-Event-ID", async (t) => {
  const { lb, nodes } = await localCluster(t);

  const h = new Harness();
  t.after(() => h.close());
  const reader = await h.page();
  await reader.goto(`http://127.0.0.1:${lb}/healthz`);
  await reader.evaluate(() => {
    window.got = [];
    window.nodes = [];
    const source = new EventSource("/sse?channel=news");
    source.onmessage = (event) => {
      const frame = JSON.parse(event.data);
      if (frame.op === "welcome") window.nodes.push(frame.node);
      if (frame.op === "msg") window.got.push(frame.data);
    };
  });
  await waitFor("the stream open", async () => (await reader.evaluate(() => window.nodes.length)) === 1);
  const under = await reader.evaluate(() => window.nodes[0]);
  const underPort = nodes[Number(under.slice(4)) - 1];
  const otherPort = nodes.find((p) => p !== underPort);

  // The publisher is on another node, straight (not through the balancer).
  const writer = await h.page();
  await writer.goto(`http://127.0.0.1:${otherPort}/healthz`);
  const publish = (from, to) => writer.evaluate(async ([from, to, port]) => {
    window.relay ??= await (async () => {
      const { Relay } = await import("/client.js");
      const relay = new Relay(`ws://127.0.0.1:${port}/ws`);
      const connected = new Promise((r) => relay.on("connected", r));
      relay.connect();
      await connected;
      return relay;
    })();
    for (let n = from; n <= to; n++) await window.relay.publish("news", n);
  }, [from, to, otherPort]);

  await publish(1, 5);
  await waitFor("the first messages", async () => (await reader.evaluate(() => window.got.length)) === 5);
  process.kill(nodePid(underPort), "SIGTERM");
  await publish(6, 30);
  await waitFor("the page on another node", async () => (await reader.evaluate(() => window.nodes.length)) === 2);
  await publish(31, 35);
  await waitFor("every message", async () => (await reader.evaluate(() => window.got.length)) >= 35);
  const got = await reader.evaluate(() => window.got);
  assert.deepEqual(got, Array.from({ length: 35 }, (_, i) => i + 1), "each message once, in order");
  const [first, second] = await reader.evaluate(() => window.nodes);
  assert.notEqual(first, second);
});
