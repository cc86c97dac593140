// How each example workflow looks when opened in ComfyUI's own frontend (headless Chromium), for
// tests/test_frontend_layout.py: every node's rectangle on screen (title bar included) after the Gentor
// widgets (the loader's summary line) have appeared, what covers each node's title bar (the sidebar, the top
// menu, or nothing: the canvas), each Gentor DOM widget's rectangle, and which Edit Image inputs are shown.
//
//   node tests/frontend_layout.cjs PLAYWRIGHT_CORE_DIR CHROMIUM SERVER_URL OUT_JSON UI_JSON...
//
// Never downloads a browser: Debian's chromium is passed in; playwright-core is only its driver.
"use strict";

const fs = require("fs");
const os = require("os");
const path = require("path");

const BOOT_TIMEOUT_MS = 180000;
const SETTLE_MS = 1500; // summaries are fetched, DOM widgets placed on the next frames
const VIEWPORT = { width: 1400, height: 900 };
const CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
  "--disable-component-update", "--no-first-run"];

async function measure(page) {
  return page.evaluate(() => {
    const app = window.app;
    const canvasEl = app.canvas.canvas;
    const ds = app.canvas.ds;
    const titleHeight = window.LiteGraph.NODE_TITLE_HEIGHT;
    const box = canvasEl.getBoundingClientRect();
    const toScreen = (x, y) => [box.left + (x + ds.offset[0]) * ds.scale, box.top + (y + ds.offset[1]) * ds.scale];
    const coveredBy = (x, y) => {
      if (x < 0 || y < 0 || x >= window.innerWidth || y >= window.innerHeight) return "outside";
      const el = document.elementFromPoint(x, y);
      if (!el || el === canvasEl) return "canvas";
      if (el.closest(".side-tool-bar-container")) return "sidebar";
      if (el.closest("[class*='minimap']")) return "minimap";
      return (el.className || el.tagName).toString().slice(0, 80);
    };
    const nodes = app.graph._nodes.map((node) => {
      const [x, y] = toScreen(node.pos[0], node.pos[1] - titleHeight);
      const w = node.size[0] * ds.scale;
      const h = (node.size[1] + titleHeight) * ds.scale;
      const widgets = (node.widgets || []).filter((wd) => wd.element && wd.name && wd.name.startsWith("gentor_"))
        .map((wd) => {
          const r = wd.element.getBoundingClientRect();
          return { name: wd.name, rect: [r.left, r.top, r.width, r.height], text: wd.element.textContent || "" };
        });
      const inputs = (node.inputs || []).map((i) => i.name);
      return {
        id: String(node.id), type: node.type, rect: [x, y, w, h],
        title: [coveredBy(x + 6, y + 6), coveredBy(x + w - 6, y + 6)], widgets, inputs,
        linked: (node.inputs || []).filter((i) => i.link != null).map((i) => i.name),
      };
    });
    const bar = document.querySelector(".side-tool-bar-container");
    const r = bar ? bar.getBoundingClientRect() : null;
    return { nodes, sidebar: r ? [r.left, r.top, r.width, r.height] : null, scale: ds.scale };
  });
}

async function main() {
  const [playwrightDir, chromiumPath, serverUrl, outPath, ...uiFiles] = process.argv.slice(2);
  if (!outPath || uiFiles.length === 0) {
    console.error("usage: frontend_layout.cjs PLAYWRIGHT_CORE_DIR CHROMIUM SERVER_URL OUT_JSON UI_JSON...");
    process.exit(2);
  }
  const { chromium } = require(playwrightDir);
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), "gentor-chromium-"));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: chromiumPath, headless: true, args: CHROMIUM_ARGS, viewport: VIEWPORT,
  });
  const pageErrors = [];
  try {
    // A first visit would open the templates browser over the graph: the tutorial counts as seen.
    await fetch(`${serverUrl}/settings/Comfy.TutorialCompleted`, { method: "POST", body: "true" });
    const page = context.pages()[0] || await context.newPage();
    page.on("pageerror", (err) => pageErrors.push(String(err)));
    await page.goto(serverUrl, { waitUntil: "domcontentloaded", timeout: BOOT_TIMEOUT_MS });
    await page.waitForFunction(
      () => window.app && window.app.graph && window.app.canvas && window.LiteGraph
        && Object.keys(window.LiteGraph.registered_node_types || {}).length > 0,
      null, { timeout: BOOT_TIMEOUT_MS });
    const results = {};
    for (const file of uiFiles) {
      const ui = JSON.parse(fs.readFileSync(file, "utf8"));
      await page.evaluate(async (graph) => { await window.app.loadGraphData(graph); }, ui);
      await page.waitForTimeout(SETTLE_MS);
      await page.evaluate(() => window.app.canvas.setDirty(true, true));
      await page.waitForTimeout(200);
      results[path.basename(file, ".json")] = await measure(page);
      if (process.env.GENTOR_LAYOUT_SHOTS) {
        await page.screenshot({ path: path.join(process.env.GENTOR_LAYOUT_SHOTS, `${path.basename(file, ".json")}.png`) });
      }
    }
    fs.writeFileSync(outPath, JSON.stringify({ results, pageErrors }, null, 2));
  } finally {
    await context.close();
    fs.rmSync(profile, { recursive: true, force: true });
  }
}

main().catch((err) => {
  console.error(err && err.stack ? err.stack : String(err));
  process.exit(1);
});
