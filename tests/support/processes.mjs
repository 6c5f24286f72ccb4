// Test helpers shared by the JavaScript suites (tests/browser, clients/js): real
// redis-server and wsrelay processes on loopback, killed when the test ends. Every
// wait has a deadline; nothing sleeps to synchronise.

import { spawn } from "node:child_process";
import net from "node:net";
import { fileURLToPath } from "node:url";

const root = fileURLToPath(new URL("../../", import.meta.url));
export const WSRELAY_BIN = process.env.WSRELAY_BIN ?? `${root}target/debug/wsrelay`;
export const API_KEY = "browser-test-key-0123456789";

/** Polls `check` (async, truthy when done) every 50 ms until `ms` pass. */
export async function waitFor(what, check, ms = 15000) {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await check().catch(() => false);
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** A free loopback port below the ephemeral range (a restarted server reuses it). */
export async function freePort() {
  for (;;) {
    const port = 20000 + Math.floor(Math.random() * 10000);
    const free = await new Promise((resolve) => {
      const server = net.createServer();
      server.once("error", () => resolve(false));
      server.listen(port, "127.0.0.1", () => server.close(() => resolve(true)));
    });
    if (free) return port;
  }
}

/** A child process that is killed when the test ends. */
class Proc {
  constructor(cmd, args) {
    this.cmd = cmd;
    this.args = args;
    this.child = null;
    this.log = "";
  }
  start() {
    this.child = spawn(this.cmd, this.args, { stdio: ["ignore", "ignore", "pipe"] });
    this.child.stderr.on("data", (d) => { this.log += d; });
    this.exited = new Promise((resolve) => this.child.once("exit", resolve));
    return this;
  }
  async stop(signal = "SIGKILL") {
    if (!this.child || this.child.exitCode !== null) return;
    this.child.kill(signal);
    await this.exited;
  }
}

export class Redis extends Proc {
  constructor(port) {
    super("redis-server", ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]);
    this.port = port;
  }
  get url() { return `redis://127.0.0.1:${this.port}`; }
  async ready() {
    await waitFor(`redis on ${this.port}`, () => new Promise((resolve) => {
      const socket = net.connect(this.port, "127.0.0.1", () => socket.end("PING\r\n"));
      socket.once("data", (d) => resolve(String(d).startsWith("+PONG")));
      socket.once("error", () => resolve(false));
    }));
    return this;
  }
}

export class Node extends Proc {
  constructor(id, port, args) {
    super(WSRELAY_BIN, ["--listen", `127.0.0.1:${port}`, "--node-id", id, "--api-key", API_KEY, ...args]);
    this.id = id;
    this.port = port;
  }
  get url() { return `http://127.0.0.1:${this.port}`; }
  async ready() {
    await waitFor(`node ${this.id} ready`, async () => (await fetch(`${this.url}/readyz`)).ok);
    return this;
  }
  async publish(ch, data) {
    const response = await fetch(`${this.url}/api/publish`, {
      method: "POST",
      headers: { authorization: `Bearer ${API_KEY}`, "content-type": "application/json" },
      body: JSON.stringify({ ch, data }),
    });
    if (!response.ok) throw new Error(`publish: ${response.status} ${await response.text()}`);
    return response.json();
  }
}

/** Starts processes for one test and stops them afterwards. */
export class Processes {
  constructor() { this.procs = []; }
  async redis() {
    const redis = new Redis(await freePort());
    this.procs.push(redis);
    return redis.start().ready();
  }
  async node(id, args) {
    const node = new Node(id, await freePort(), args);
    this.procs.push(node);
    return node.start().ready();
  }
  async close() {
    await Promise.all(this.procs.map((p) => p.stop()));
  }
}
