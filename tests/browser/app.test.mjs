// The chat page in application mode (`/?app=<backend>`) in headless Chromium, with
// the example backend (examples/backend, Python with Flask; the interpreter is
// $WSRELAY_PYTHON, as scripts/test.sh sets it): refused until the user logs in at
// the backend, whose cookie then reaches the relay; lines the backend refuses are
// shown as refused, stored ones come back after a reload through `rpc` history.

import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { fileURLToPath } from "node:url";
import { freePort } from "../support/processes.mjs";
import { Harness, lines, say, waitFor } from "./harness.mjs";

const root = fileURLToPath(new URL("../../", import.meta.url));
const PYTHON = process.env.WSRELAY_PYTHON ?? "python3";

/** The example backend on `port`, stopped when the test ends. */
async function backend(t, port, relayUrl) {
  const dir = mkdtempSync(`${tmpdir()}/wsrelay-app-`);
  const child = spawn(PYTHON, [`${root}examples/backend/app.py`, "--port", String(port),
    "--db", `${dir}/chat.db`, "--relay-api", relayUrl], { stdio: ["ignore", "ignore", "pipe"] });
  let log = "";
  child.stderr.on("data", (d) => { log += d; });
  t.after(() => {
    child.kill();
    rmSync(dir, { recursive: true, force: true });
  });
  const url = `http://127.0.0.1:${port}`;
  await waitFor("the backend", async () => (await fetch(`${url}/healthz`)).ok).catch((e) => {
    throw new Error(`${e.message}: ${log}`);
  });
  return url;
}

test("application mode: log in at the backend, refusals shown, history over rpc", async (t) => {
  const h = new Harness();
  t.after(() => h.close());
  const port = await freePort();
  const app = `http://127.0.0.1:${port}`;
  const proxies = ["connect", "refresh", "subscribe", "publish", "rpc"]
    .flatMap((p) => [`--proxy-${p}-url`, `${app}/relay/${p}`]);
  const node = await h.node("a", ["--config", `${root}examples/backend/wsrelay.toml`, ...proxies]);
  await backend(t, port, node.url);

  const page = await h.page();
  await page.goto(`${node.url}/?app=${encodeURIComponent(app)}`);
  await waitFor("the refusal", async () => (await lines(page)).some((l) => l.includes("refused (4401): log in first")));
  await waitFor("no reconnecting", async () => (await page.textContent("#status")).includes("reload the page"));

  // The page's link leads to the backend's login, which comes back to the page.
  await page.click("#log a");
  await page.fill("input[name=user]", "ada");
  await page.click("button");
  await waitFor("the room", async () => (await page.textContent("#status")).includes("#chat:lobby · node a"));

  await say(page, "hello from ada");
  await waitFor("the stored line", async () => (await lines(page)).includes("ada: hello from ada"));
  await say(page, "some spam");
  await waitFor("the refusal", async () => (await lines(page)).some((l) => l.includes("refused (4400)")));

  await page.reload();
  await waitFor("the history", async () => (await lines(page)).includes("ada: hello from ada"));
  assert.ok(!(await lines(page)).some((l) => l.includes("spam")), "the refused line was not stored");
});
