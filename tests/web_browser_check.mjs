// Drives the real ComfyUI page in headless Chromium for tests/test_web_browser.py (playwright-core with
// the system Chromium; never downloads a browser). Steps are reported as JSON lines on stdout; the Python
// side answers "restarted" on stdin after restarting the server on the same port.
//   node web_browser_check.mjs <playwright-core folder> <server url> <workflow json> <screenshot png> <chromium>
import { createRequire } from "node:module";
import { readFileSync } from "node:fs";
import * as readline from "node:readline";

const require = createRequire(import.meta.url);
const [playwrightDir, url, workflowPath, screenshotPath, executablePath] = process.argv.slice(2);
const { chromium } = require(playwrightDir);
const STEP_TIMEOUT = 120_000;

const lines = readline.createInterface({ input: process.stdin });
const answers = [];
let waiter = null;
lines.on("line", (l) => (waiter ? (waiter(l), (waiter = null)) : answers.push(l)));
const nextAnswer = () => (answers.length ? Promise.resolve(answers.shift()) : new Promise((r) => (waiter = r)));
const report = (step, data = {}) => console.log(JSON.stringify({ step, ...data }));
async function closeDialogs(page) {
  // Dialogs the frontend may open by itself (templates browser, release notes) cover the page.
  for (let i = 0; i < 10 && (await page.locator(".p-dialog-mask").count()) > 0; i++) {
    const close = page.locator(".p-dialog-mask .p-dialog-close-button, .p-dialog-mask button[aria-label='Close']");
    if (await close.count()) await close.first().click({ timeout: 5_000 }).catch(() => {});
    else await page.keyboard.press("Escape");
    await page.waitForTimeout(500);
  }
}

const showGraphBeside = (page, left) => page.evaluate((x) => {
  // litegraph maps graph to screen as (pos + offset) * scale: put the graph's origin right of the panel.
  const canvas = window.comfyAPI.app.app.canvas;
  canvas.ds.scale = 0.85;
  canvas.ds.offset = [(x + 30) / 0.85, 190];
  canvas.setDirty(true, true);
}, left);

const browser = await chromium.launch({
  executablePath,
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--no-first-run"],
});
const errors = [];
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  page.on("console", (msg) => {
    if (msg.type() === "error" || msg.type() === "warning") errors.push({ type: msg.type(), text: msg.text(),
      url: msg.location()?.url || "" });
  });
  page.on("pageerror", (err) => errors.push({ type: "pageerror", text: String(err.stack || err), url: "" }));
  page.setDefaultTimeout(STEP_TIMEOUT);
  // A first visit would open the templates browser: say the tutorial was seen (a user setting).
  await fetch(`${url}/settings/Comfy.TutorialCompleted`, { method: "POST", body: "true" });
  await page.goto(url);
  await page.waitForFunction(() => window.comfyAPI?.app?.app?.graph && window.gentorPanel);
  report("loaded", { frontend: await page.evaluate(() => window.__COMFYUI_FRONTEND_VERSION__ || "") });

  // Queue the tiny workflow exactly as the Run button does.
  const workflow = JSON.parse(readFileSync(workflowPath, "utf-8"));
  await page.evaluate(async (wf) => {
    const app = window.comfyAPI.app.app;
    await app.loadGraphData(wf);
    await app.queuePrompt(0, 1);
  }, workflow);
  report("queued");

  // The loader node shows its one-line summary; the sampler shows its text output after the run.
  await page.waitForFunction(() => [...document.querySelectorAll(".gentor-text")].some((t) => t.value.includes("steps=")));
  const nodeText = await page.evaluate(() => [...document.querySelectorAll(".gentor-text")].map((t) => t.value));
  await page.waitForFunction(() => [...document.querySelectorAll(".gentor-node-summary")].some((d) => d.textContent.includes("· loaded ")));
  const summary = await page.evaluate(() => [...document.querySelectorAll(".gentor-node-summary")].map((d) => d.textContent));
  report("ran", { nodeText, summary });

  // Open the panel: the sidebar tab where the frontend has one, else the fallback toggle.
  await closeDialogs(page);
  const tab = page.locator(".gentor-models-tab-button");
  if (await tab.count()) await tab.first().click();
  else await page.locator(".gentor-toggle").click();
  await page.waitForSelector(".gentor-panel .gentor-row");
  const rows = await page.$$eval(".gentor-panel .gentor-row", (els) => els.map((r) => ({
    id: r.dataset.id, kind: r.querySelector(".gentor-kind").textContent, size: r.querySelector(".gentor-size").textContent,
  })));
  // The screenshot shows the panel beside the graph (loader summary line, sampler text).
  const box = await page.locator(".gentor-panel").first().boundingBox();
  await showGraphBeside(page, box.x + box.width);
  await page.waitForTimeout(300);
  await page.screenshot({ path: screenshotPath, clip: { x: 0, y: 0, width: 1400, height: Math.min(900, box.y + box.height + 40) } });
  report("panel", { rows, sidebar: (await tab.count()) > 0 });

  // Unload one row, then the rest with their own buttons; the panel empties.
  while ((await page.locator(".gentor-panel .gentor-row .gentor-unload:not([disabled])").count()) > 0) {
    const before = await page.locator(".gentor-panel .gentor-row").count();
    await page.locator(".gentor-panel .gentor-row .gentor-unload:not([disabled])").first().click();
    await page.waitForFunction((n) => document.querySelectorAll(".gentor-panel .gentor-row").length < n, before);
  }
  await page.waitForSelector(".gentor-panel .gentor-empty");
  report("unloaded", { empty: await page.locator(".gentor-panel .gentor-empty").textContent() });

  // Server loss: the panel says so, then recovers on its own once the server is back.
  report("stop_server");
  await page.waitForSelector(".gentor-panel .gentor-disconnected", { timeout: 60_000 });
  report("disconnected_shown");
  const answer = await nextAnswer();
  if (answer !== "restarted") throw new Error(`unexpected answer ${answer}`);
  await page.waitForSelector(".gentor-panel .gentor-empty", { timeout: STEP_TIMEOUT });
  report("recovered");
  report("done", { errors });
} catch (err) {
  const pages = browser.contexts().flatMap((c) => c.pages());
  if (pages.length) await pages[0].screenshot({ path: `${screenshotPath}.failed.png` }).catch(() => {});
  report("failed", { error: String(err.stack || err), errors });
  process.exitCode = 1;
} finally {
  await browser.close();
  lines.close();
}
