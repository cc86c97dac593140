// How each example workflow looks when opened in ComfyUI's own frontend (headless Chromium), for
// tests/test_frontend_layout.py: every node's rectangle on screen (title bar included) after the Gentor
// widgets (the loader's summary line) have appeared, what covers each node's title bar (the sidebar, the top
// menu, or nothing: the canvas), each Gentor DOM widget's rectangle, and which Edit Image inputs are shown.
//
//   node tests/frontend_layout.cjs PLAYWRIGHT_CORE_DIR CHROMIUM SERVER_URL OUT_JSON UI_JSON...
"use strict";

const path = require("path");
const { run } = require("./frontend_page.cjs");

const SETTLE_MS = 1500; // summaries are fetched, DOM widgets placed on the next frames
const REDRAW_MS = 200;
const VIEWPORT = { width: 1400, height: 900 };

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

run("frontend_layout.cjs", async (page, file, ui) => {
  await page.evaluate(async (graph) => { await window.app.loadGraphData(graph); }, ui);
  await page.waitForTimeout(SETTLE_MS);
  await page.evaluate(() => window.app.canvas.setDirty(true, true));
  await page.waitForTimeout(REDRAW_MS);
  const result = await measure(page);
  if (process.env.GENTOR_LAYOUT_SHOTS) {
    await page.screenshot({ path: path.join(process.env.GENTOR_LAYOUT_SHOTS, `${path.basename(file, ".json")}.png`) });
  }
  return result;
}, { viewport: VIEWPORT });
