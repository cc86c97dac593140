// UI workflow -> API prompt by ComfyUI's own frontend, driven headless (an independent second conversion
// for tests/test_frontend_conversion.py). Exactly what the Run button posts: app.loadGraphData(ui), then
// app.graphToPrompt().output.
//
//   node tests/frontend_convert.cjs PLAYWRIGHT_CORE_DIR CHROMIUM SERVER_URL OUT_JSON UI_JSON...
"use strict";

const { run } = require("./frontend_page.cjs");

run("frontend_convert.cjs", (page, _file, ui) => page.evaluate(async (graph) => {
  await window.app.loadGraphData(graph);
  const prompt = await window.app.graphToPrompt();
  return prompt.output;
}, ui));
