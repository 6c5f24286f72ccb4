// Takes the README's screenshots of the admin page (docs/img/admin.png and
// docs/img/admin-channel.png) from a real cluster: three nodes on two Redis shards,
// WebSocket clients and varying traffic for SCREENSHOT_SECONDS (default 180), then
// node c SIGKILLed, so the page shows a silent node. Run after `cargo build --bin
// wsrelay`: `cd tests/browser && node screenshots.mjs`.

import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { API_KEY, Harness, waitFor } from "./harness.mjs";

const out = fileURLToPath(new URL("../../docs/img/", import.meta.url));
const seconds = Number(process.env.SCREENSHOT_SECONDS ?? 180);
const h = new Harness();
try {
  const dir = mkdtempSync(join(tmpdir(), "wsrelay-shots-"));
  const config = join(dir, "wsrelay.toml");
  writeFileSync(config, "[namespaces.room]\nhistory-size = 50\nhistory-ttl = \"1h\"\npresence = true\n");
  const [r1, r2] = [await h.redis(), await h.redis()];
  const args = ["--redis-url", `${r1.url},${r2.url}`, "--node-ttl", "6s", "--config", config];
  const nodes = [await h.node("a", args), await h.node("b", args), await h.node("c", args)];

  // Clients: a page per node holding several WebSockets, opened over time.
  const holders = [];
  for (const node of nodes) {
    const page = await h.page();
    await page.goto(`${node.url}/healthz`);
    holders.push({ node, page });
  }
  const open = (holder, channels) => holder.page.evaluate((url) => {
    window.sockets ??= [];
    window.sockets.push(new WebSocket(url));
  }, `ws://127.0.0.1:${holder.node.port}/ws?${channels.map((c) => `channel=${c}`).join("&")}`);

  const admin = await h.page();
  await admin.setViewportSize({ width: 1280, height: 900 });
  await admin.goto(`${nodes[0].url}/admin`);
  await admin.fill("#key", API_KEY);
  await admin.click("#login button");

  const start = Date.now();
  let i = 0;
  while (Date.now() - start < seconds * 1000) {
    const t = (Date.now() - start) / 1000;
    // Connections ramp up; publications follow a wave with a spike.
    if (i % 4 === 0 && i < 160) await open(holders[i % 3], ["room:lobby", `news:${i % 5}`]);
    const burst = Math.round(4 + 3 * Math.sin(t / 15) + (t > seconds * 0.6 && t < seconds * 0.65 ? 20 : 0));
    for (let k = 0; k < burst; k++) {
      const ch = k % 3 === 0 ? "room:lobby" : `news:${k % 5}`;
      await nodes[k % 3].publish(ch, { text: `message ${i}.${k}`, at: Date.now() });
    }
    i++;
    await new Promise((r) => setTimeout(r, 250));
  }
  await nodes[2].stop("SIGKILL");
  await waitFor("c silent on the page", async () =>
    (await admin.textContent('#nodes tr[data-node="c"] td.state')) === "not heard from");
  // The cluster's line ends where the totals are (c's last sample just aged out).
  await waitFor("the cluster line without c", async () => {
    const total = Number((await admin.textContent("#summary")).match(/(\d+) connections/)[1]);
    const last = await admin.$eval('#chart-connections polyline[data-series="cluster"]', (l) => Number(l.dataset.last));
    return last === total;
  });
  await admin.screenshot({ path: `${out}admin.png`, fullPage: true });

  await admin.goto(`${nodes[0].url}/admin#channel=room:lobby`);
  await admin.fill("#key", API_KEY);
  await admin.click("#login button");
  await waitFor("the channel page", async () => (await admin.textContent("#ch-history")).startsWith("epoch"));
  await waitFor("its presence", async () => /client/.test(await admin.textContent("#ch-presence")));
  await admin.screenshot({ path: `${out}admin-channel.png`, fullPage: true });
  console.log(`wrote ${out}admin.png and ${out}admin-channel.png`);
} finally {
  await h.close();
}
