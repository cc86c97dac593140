// Gentor frontend extension (no build step). Only the public extension API: app.registerExtension,
// api.fetchApi and api events; app/api come from the two shim modules every frontend since 1.x ships and
// that print no deprecation warning (frontend 1.27 and 1.35 alike).
//  - a "Gentor models" sidebar tab (or a toggle button + panel where the frontend has no sidebar API)
//    listing the shared model cache with sizes and placement, with Unload buttons;
//  - a one-line summary under the model choice of every Gentor loader node;
//  - the text output (notes, reasoning, enhanced prompt) shown on the Gentor nodes that return one;
//  - only the connected reference inputs (image_N) plus one free one on the nodes that take images.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { GentorPanel } from "./gentor_panel.js";
import { LoaderSummaries, showText } from "./gentor_nodes.js";
import { fitImageInputs, followImageInputs } from "./gentor_inputs.js";

const TAB_ID = "gentor-models";
const REFRESH_EVENTS = ["execution_success", "execution_error", "execution_interrupted"];

function addStylesheet() {
  const link = document.createElement("link");
  link.rel = "stylesheet";
  link.href = new URL("./gentor.css", import.meta.url).href;
  document.head.appendChild(link);
}

function sidebarApi() {
  // Newer frontends group it as extensionManager.sidebarTab; 1.27 and 1.35 also keep the older method.
  const manager = app.extensionManager;
  const grouped = manager?.sidebarTab;
  if (grouped && typeof grouped.registerSidebarTab === "function") return (tab) => grouped.registerSidebarTab(tab);
  if (manager && typeof manager.registerSidebarTab === "function") return (tab) => manager.registerSidebarTab(tab);
  return null;
}

function mountToggle(panel) {
  // Fallback without a sidebar API: a small fixed button that shows/hides a floating panel.
  const button = document.createElement("button");
  button.className = "gentor-toggle";
  button.textContent = "Gentor models";
  const box = document.createElement("div");
  box.className = "gentor-floating";
  box.hidden = true;
  panel.mount(box);
  button.addEventListener("click", () => {
    box.hidden = !box.hidden;
    if (!box.hidden) panel.refresh();
  });
  document.body.append(button, box);
}

const panel = new GentorPanel(api);
const summaries = new LoaderSummaries(api);
const imageInputs = new Map(); // node type -> its image_N input specs

function fitInputs(node) {
  const specs = imageInputs.get(node.comfyClass || node.type);
  if (specs) fitImageInputs(node, specs);
}

app.registerExtension({
  name: "gentor.models",

  async setup() {
    addStylesheet();
    const register = sidebarApi();
    if (register) {
      register({
        id: TAB_ID,
        icon: "pi pi-server",
        title: "Gentor models",
        tooltip: "Gentor models: what the shared cache holds",
        type: "custom",
        render: (el) => {
          panel.mount(el);
          panel.refresh();
        },
        destroy: () => panel.unmount(),
      });
    } else {
      mountToggle(panel);
    }
    for (const name of REFRESH_EVENTS) {
      api.addEventListener(name, () => {
        panel.refresh();
        summaries.refreshAll(app.graph);
      });
    }
    api.addEventListener("reconnecting", () => panel.setDisconnected());
    api.addEventListener("reconnected", () => {
      panel.refresh();
      summaries.refreshAll(app.graph);
    });
    window.gentorPanel = panel; // for scripted checks (tests) and the console
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.name?.startsWith("Gentor")) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      if (Array.isArray(message?.text)) showText(this, message.text.join("\n"));
    };
    const specs = followImageInputs(nodeType, nodeData);
    if (specs) imageInputs.set(nodeData.name, specs);
  },

  async nodeCreated(node) {
    if (summaries.isLoader(node)) summaries.attach(node);
    fitInputs(node);
  },

  async loadedGraphNode(node) {
    if (summaries.isLoader(node)) summaries.attach(node);
    fitInputs(node);
  },
});
