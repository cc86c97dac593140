// The frontend page both frontend scripts drive (tests/frontend_convert.cjs, tests/frontend_layout.cjs):
// Debian's Chromium, headless, a fresh profile, ComfyUI's page booted until its node types are registered.
// Runs `script(page, file, ui)` for each UI workflow file and writes {results: {name: value}, pageErrors}.
// Never downloads a browser: the Chromium is passed in; playwright-core is only its driver.
"use strict";

const fs = require("fs");
const os = require("os");
const path = require("path");

const BOOT_TIMEOUT_MS = 180000;
const CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
  "--disable-component-update", "--no-first-run"];

async function eachWorkflow(usage, script, contextOptions = {}) {
  const [playwrightDir, chromiumPath, serverUrl, outPath, ...uiFiles] = process.argv.slice(2);
  if (!outPath || uiFiles.length === 0) {
    console.error(`usage: ${usage} PLAYWRIGHT_CORE_DIR CHROMIUM SERVER_URL OUT_JSON UI_JSON...`);
    process.exit(2);
  }
  const { chromium } = require(playwrightDir);
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), "gentor-chromium-"));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: chromiumPath, headless: true, args: CHROMIUM_ARGS, ...contextOptions,
  });
  const pageErrors = [];
  try {
    // A first visit would open the templates browser over the graph: the tutorial counts as seen.
    await fetch(`${serverUrl}/settings/Comfy.TutorialCompleted`, { method: "POST", body: "true" });
    const page = context.pages()[0] || await context.newPage();
    page.on("pageerror", (err) => pageErrors.push(String(err)));
    await page.goto(serverUrl, { waitUntil: "domcontentloaded", timeout: BOOT_TIMEOUT_MS });
    // The frontend exposes its app object as window.app once the node definitions are registered.
    await page.waitForFunction(
      () => window.app && window.app.graph && typeof window.app.graphToPrompt === "function"
        && window.LiteGraph && Object.keys(window.LiteGraph.registered_node_types || {}).length > 0,
      null, { timeout: BOOT_TIMEOUT_MS });
    const results = {};
    for (const file of uiFiles) {
      const ui = JSON.parse(fs.readFileSync(file, "utf8"));
      results[path.basename(file, ".json")] = await script(page, file, ui);
    }
    fs.writeFileSync(outPath, JSON.stringify({ results, pageErrors }, null, 2));
  } finally {
    await context.close();
    fs.rmSync(profile, { recursive: true, force: true });
  }
}

function run(usage, script, contextOptions) {
  eachWorkflow(usage, script, contextOptions).catch((err) => {
    console.error(err && err.stack ? err.stack : String(err));
    process.exit(1);
  });
}

module.exports = { run };
