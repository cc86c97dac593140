// The "Gentor models" panel: what the shared model cache holds (GET /gentor/models), with Unload buttons
// (POST /gentor/unload). Plain DOM, no framework; shows "disconnected" while the server is away.

const GB = 1e9;
const MB = 1e6;

const KB = 1e3;

export function formatBytes(n) {
  if (!Number.isFinite(n)) return "?";
  if (n <= 0) return "—"; // weightless parts: tokenizer, scheduler, processor
  if (n >= GB) return `${(n / GB).toFixed(2)} GB`;
  return n >= MB ? `${(n / MB).toFixed(1)} MB` : `${(n / KB).toFixed(1)} kB`;
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function shortSource(source) {
  // ".../models/qwen_image/Qwen-Image/transformer" -> "Qwen-Image/transformer"
  const parts = String(source || "").split(/[\\/]/).filter(Boolean);
  return parts.slice(-2).join("/");
}

function placementText(entry) {
  const where = entry.placement || "?";
  const dtype = entry.storage_dtype
    ? entry.storage_dtype === entry.compute_dtype || !entry.compute_dtype
      ? entry.storage_dtype
      : `${entry.storage_dtype}→${entry.compute_dtype}`
    : "";
  const devices = entry.bytes_by_device
    ? Object.entries(entry.bytes_by_device).map(([d, b]) => `${d} ${formatBytes(b)}`).join(", ")
    : "";
  return [where, dtype, devices].filter(Boolean).join(" · ");
}

async function readJson(response) {
  try {
    return await response.json();
  } catch {
    return {};
  }
}

export class GentorPanel {
  constructor(api) {
    this.api = api;
    this.root = null;
    this.state = { models: [], total: 0, busy: false, connected: true, error: "", loading: false };
    this.pending = null;
  }

  mount(root) {
    this.root = root;
    root.classList.add("gentor-panel");
    this.render();
  }

  unmount() {
    this.root = null;
  }

  setDisconnected() {
    this.state.connected = false;
    this.render();
  }

  async refresh() {
    // One request at a time: callers during a refresh share its result.
    if (this.pending) return this.pending;
    this.pending = this.load().finally(() => {
      this.pending = null;
    });
    return this.pending;
  }

  async load() {
    this.state.loading = true;
    this.render();
    try {
      const response = await this.api.fetchApi("/gentor/models", { cache: "no-store" });
      const body = await readJson(response);
      if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
      Object.assign(this.state, {
        models: body.models || [], total: body.total_bytes || 0, busy: !!body.busy, connected: true, error: "",
      });
    } catch (err) {
      // fetch rejects with a TypeError when the server is unreachable.
      if (err instanceof TypeError) this.state.connected = false;
      else this.state.error = String(err.message || err);
    } finally {
      this.state.loading = false;
      this.render();
    }
  }

  async unload(body) {
    try {
      const response = await this.api.fetchApi("/gentor/unload", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
      });
      const answer = await readJson(response);
      this.state.error = response.ok ? "" : answer.error || `HTTP ${response.status}`;
    } catch (err) {
      if (err instanceof TypeError) this.state.connected = false;
      else this.state.error = String(err.message || err);
    }
    await this.refresh();
  }

  render() {
    const root = this.root;
    if (!root) return;
    const s = this.state;
    root.replaceChildren();
    const head = el("div", "gentor-head");
    head.append(el("span", "gentor-title", "Gentor models"));
    const status = el("span", "gentor-status");
    status.textContent = !s.connected ? "disconnected" : s.loading ? "…" : s.busy ? "running" : "";
    status.dataset.state = !s.connected ? "disconnected" : s.busy ? "busy" : "ok";
    head.append(status);
    const refresh = el("button", "gentor-button gentor-refresh", "Refresh");
    refresh.addEventListener("click", () => this.refresh());
    const all = el("button", "gentor-button gentor-unload-all", "Unload all");
    all.disabled = !s.connected || s.busy || !s.models.some((m) => !m.in_use);
    all.addEventListener("click", () => this.unload({ all: true }));
    head.append(refresh, all);
    root.append(head);

    if (!s.connected) {
      root.append(el("div", "gentor-note gentor-disconnected", "Disconnected from the server; retrying…"));
      return;
    }
    root.append(el("div", "gentor-summary",
      `${s.models.length} component${s.models.length === 1 ? "" : "s"} · ${formatBytes(s.total)}`));
    if (s.error) root.append(el("div", "gentor-note gentor-error", s.error));
    if (!s.models.length) {
      root.append(el("div", "gentor-note gentor-empty", "Nothing loaded."));
      return;
    }
    const list = el("div", "gentor-list");
    for (const m of s.models) {
      const row = el("div", "gentor-row");
      row.dataset.id = m.id;
      const kind = el("div", "gentor-kind", m.kind);
      const size = el("div", "gentor-size", formatBytes(m.bytes));
      const button = el("button", "gentor-button gentor-unload", m.in_use ? "In use" : "Unload");
      button.disabled = !!m.in_use || s.busy;
      button.addEventListener("click", () => this.unload({ id: m.id }));
      const meta = el("div", "gentor-meta");
      meta.append(el("div", "gentor-source", shortSource(m.source)), el("div", "gentor-placement", placementText(m)));
      row.title = m.source + (m.users?.length ? `\nused by: ${m.users.join(", ")}` : "");
      row.append(kind, size, button, meta);
      list.append(row);
    }
    root.append(list);
  }
}
