// Per-node additions: a one-line summary under a Gentor loader's model choice (GET /gentor/summary) and
// the text output (notes, reasoning, enhanced prompt) of Gentor nodes. Both are DOM widgets that are never
// saved into the workflow or the prompt.

const SUMMARY_WIDGET = "gentor_summary";
const TEXT_WIDGET = "gentor_text";
const LINE_HEIGHT = 22;
const SUMMARY_HEIGHT = 40; // the line wraps onto a second row on narrow nodes; the full text is its tooltip
const MEMORY_NODE = "GentorMemoryOptions";
const MEMORY_INPUTS = ["weight_dtype", "compute_dtype", "offload", "vram_budget_gb"]; // /gentor/summary params

function addDomWidget(node, name, element, height) {
  const widget = node.addDOMWidget(name, name, element, {
    getValue: () => element.value ?? element.textContent,
    setValue: () => {},
    getMinHeight: () => height,
    serialize: false, // not part of the prompt
  });
  widget.serialize = false; // not part of the saved workflow's widgets_values
  return widget;
}

export function showText(node, text) {
  let widget = node.widgets?.find((w) => w.name === TEXT_WIDGET);
  if (!widget) {
    const area = document.createElement("textarea");
    area.className = "gentor-text comfy-multiline-input";
    area.readOnly = true;
    widget = addDomWidget(node, TEXT_WIDGET, area, 4 * LINE_HEIGHT);
    widget.gentorElement = area;
  }
  widget.gentorElement.value = text;
  node.setDirtyCanvas?.(true, true);
}

export class LoaderSummaries {
  constructor(api) {
    this.api = api;
    this.backends = null; // loader node type -> folder keys, from GET /gentor/backends
  }

  isLoader(node) {
    const type = node?.comfyClass || node?.type || "";
    return type.startsWith("GentorLoad");
  }

  async folderKeys(node) {
    if (!this.backends) {
      try {
        const response = await this.api.fetchApi("/gentor/backends", { cache: "no-store" });
        const list = response.ok ? await response.json() : [];
        this.backends = Object.fromEntries(list.map((b) => [b.loader_node, b.folder_keys]));
      } catch {
        return []; // server away: the next refresh tries again
      }
    }
    return this.backends[node.comfyClass || node.type] || [];
  }

  modelWidget(node) {
    const widgets = node.widgets || [];
    return widgets.find((w) => w.name === "model_name") || widgets.find((w) => w.type === "combo");
  }

  // The widget values of the Gentor Memory Options node wired to the loader's memory input (the summary's
  // VRAM estimate follows them), or {} when none is wired.
  memoryOptions(node) {
    const input = node.inputs?.find((i) => i.name === "memory");
    const links = node.graph?.links;
    const link = input?.link != null ? (links?.get?.(input.link) ?? links?.[input.link]) : null;
    const source = link ? node.graph.getNodeById(link.origin_id) : null;
    if ((source?.comfyClass || source?.type) !== MEMORY_NODE) return {};
    const values = (source.widgets || []).filter((w) => MEMORY_INPUTS.includes(w.name));
    return Object.fromEntries(values.map((w) => [w.name, String(w.value)]));
  }

  attach(node) {
    const summaries = this;
    const choice = this.modelWidget(node);
    if (!choice) return;
    if (!node.widgets.find((w) => w.name === SUMMARY_WIDGET)) {
      const line = document.createElement("div");
      line.className = "gentor-node-summary";
      const widget = addDomWidget(node, SUMMARY_WIDGET, line, SUMMARY_HEIGHT);
      widget.gentorElement = line;
      const callback = choice.callback;
      choice.callback = (...args) => {
        const out = callback?.apply(choice, args);
        this.refresh(node);
        return out;
      };
      const onConnectionsChange = node.onConnectionsChange;
      node.onConnectionsChange = function (...args) {
        const out = onConnectionsChange?.apply(this, args);
        summaries.refresh(node); // a Memory Options node wired or unwired changes the estimate
        return out;
      };
    }
    this.refresh(node);
  }

  refreshAll(graph) {
    for (const node of graph?._nodes || graph?.nodes || []) {
      if (this.isLoader(node) && node.widgets?.some((w) => w.name === SUMMARY_WIDGET)) this.refresh(node);
    }
  }

  async refresh(node) {
    const widget = node.widgets?.find((w) => w.name === SUMMARY_WIDGET);
    const choice = this.modelWidget(node);
    if (!widget || !choice) return;
    const name = choice.value;
    const line = widget.gentorElement;
    if (!name) {
      line.textContent = "no model selected";
      return;
    }
    for (const key of await this.folderKeys(node)) {
      let response;
      try {
        const query = new URLSearchParams({ folder: key, name: String(name), ...this.memoryOptions(node) });
        response = await this.api.fetchApi(`/gentor/summary?${query}`, { cache: "no-store" });
      } catch {
        line.textContent = "server disconnected";
        return;
      }
      if (response.status === 404) continue; // not in this folder key: try the backend's next one
      const body = await response.json().catch(() => ({}));
      if (choice.value !== name) return; // the choice changed while we waited
      line.textContent = response.ok ? body.line : body.error || `HTTP ${response.status}`;
      line.title = response.ok ? `${body.line}\n${body.path}` : line.textContent;
      return;
    }
    line.textContent = `${name}: not found in the model folders`;
  }
}
