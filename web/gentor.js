// Gentor frontend extension: show the task samplers' notes (the `text` output) on the node.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const TEXT_NODES = new Set(["GentorTextToImage", "GentorEditImage"]);
const WIDGET = "gentor_notes";

app.registerExtension({
  name: "gentor.notes",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!TEXT_NODES.has(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = (message?.text ?? []).join("\n");
      let widget = this.widgets?.find((w) => w.name === WIDGET);
      if (!widget) {
        widget = ComfyWidgets.STRING(this, WIDGET, ["STRING", { multiline: true }], app).widget;
        widget.inputEl.readOnly = true;
        widget.serialize = false; // never part of the saved workflow's widgets_values
      }
      widget.value = text;
    };
  },
});
