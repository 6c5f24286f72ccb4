// Test harness for the browser tests: the shared process helpers, and a headless
// Chromium (Debian's, driven by playwright-core, which downloads no browser).

import { chromium } from "playwright-core";
import { Processes } from "../support/processes.mjs";

export { API_KEY, waitFor } from "../support/processes.mjs";
export const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";

/** Starts processes and pages for one test and stops them afterwards. */
export class Harness extends Processes {
  constructor() {
    super();
    this.browser = null;
  }
  async page() {
    this.browser ??= await chromium.launch({
      executablePath: CHROMIUM,
      headless: true,
      args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"],
    });
    return this.browser.newPage();
  }
  async close() {
    await this.browser?.close();
    await super.close();
  }
}

/** The text of every line in a chat page's log (without its time). */
export const lines = (page) =>
  page.$$eval("#log p", (ps) => ps.map((p) => (p.querySelector(".body") ?? p).textContent));

/** Types a line into a chat page and sends it. */
export async function say(page, text) {
  await page.fill("#text", text);
  await page.press("#text", "Enter");
}
