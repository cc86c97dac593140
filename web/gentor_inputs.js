// The optional reference inputs image_1 … image_N of Gentor nodes (Edit Image, Describe Image, Enhance
// Prompt): the editor shows the connected ones plus one free input, instead of all N. The inputs keep their
// ids (image_1, image_2, …), so API prompts and workflows saved with every input are unchanged; only the
// unconnected inputs beyond the last connected one are taken off the node, and put back (in order) as soon as
// the last shown one is connected. Uses only the litegraph node API every frontend has (addInput,
// removeInput, onConnectionsChange), no version-specific dynamic-input feature.

const IMAGE_INPUT = /^image_(\d+)$/;
export const FREE_INPUTS = 1; // unconnected image inputs offered beyond the last connected one

function imageIndex(input) {
  const match = IMAGE_INPUT.exec(input?.name || "");
  return match ? Number(match[1]) : 0;
}

/** {name: [type, options]} of a node definition's optional image_N inputs, in order (empty: none). */
export function imageInputSpecs(nodeData) {
  const optional = nodeData?.input?.optional || {};
  return Object.fromEntries(Object.entries(optional).filter(([name]) => IMAGE_INPUT.test(name)));
}

function linkOf(graph, id) {
  if (id == null || !graph) return null;
  if (typeof graph.getLink === "function") return graph.getLink(id);
  const links = graph.links;
  return (typeof links?.get === "function" ? links.get(id) : links?.[id]) || null;
}

function renumberLinks(node, from) {
  // Inputs moved to other slots: their links must point at the new slot (drawing and slot lookups use it).
  for (let slot = from; slot < node.inputs.length; slot++) {
    const link = linkOf(node.graph, node.inputs[slot].link);
    if (link) link.target_slot = slot;
  }
}

function keepImagesInOrder(node) {
  // One block image_1, image_2, … where the first image input is: a frontend that restores a saved node onto
  // a freshly created (already fitted) one appends the inputs it lacks after the others.
  const first = node.inputs.findIndex((i) => imageIndex(i));
  if (first < 0) return false;
  const images = node.inputs.filter((i) => imageIndex(i)).sort((a, b) => imageIndex(a) - imageIndex(b));
  const others = node.inputs.filter((i) => !imageIndex(i));
  const before = node.inputs.slice(0, first).length;
  const ordered = [...others.slice(0, before), ...images, ...others.slice(before)];
  if (ordered.every((input, slot) => input === node.inputs[slot])) return false;
  node.inputs.splice(0, node.inputs.length, ...ordered);
  renumberLinks(node, 0);
  return true;
}

/** Show image_1 … image_(last connected + FREE_INPUTS), at most every input the node defines. */
export function fitImageInputs(node, specs) {
  const names = Object.keys(specs);
  if (!names.length || !node.inputs) return;
  const connected = node.inputs.filter((i) => imageIndex(i) && i.link != null).map(imageIndex);
  const want = Math.min(names.length, Math.max(0, ...connected) + FREE_INPUTS);
  let changed = false;
  for (let slot = node.inputs.length - 1; slot >= 0; slot--) {
    const input = node.inputs[slot];
    if (imageIndex(input) > want && input.link == null) {
      node.removeInput(slot);
      changed = true;
    }
  }
  for (let k = 1; k <= want; k++) {
    const name = `image_${k}`;
    if (node.inputs.some((i) => i.name === name)) continue;
    const [type, options] = specs[name] || ["IMAGE", {}];
    node.addInput(name, type, options?.tooltip ? { tooltip: options.tooltip } : undefined);
    const added = node.inputs.pop(); // addInput appends: move it right after image_(k-1)
    const previous = node.inputs.findIndex((i) => i.name === `image_${k - 1}`);
    const at = previous >= 0 ? previous + 1 : node.inputs.length;
    node.inputs.splice(at, 0, added);
    renumberLinks(node, at);
    changed = true;
  }
  changed = keepImagesInOrder(node) || changed;
  if (changed) {
    node.setSize([node.size[0], node.computeSize()[1]]);
    node.setDirtyCanvas?.(true, true);
  }
}

/** Patch a node type so its instances keep fitting their image inputs to what is connected. */
export function followImageInputs(nodeType, nodeData) {
  const specs = imageInputSpecs(nodeData);
  if (!Object.keys(specs).length) return null;
  const onConnectionsChange = nodeType.prototype.onConnectionsChange;
  nodeType.prototype.onConnectionsChange = function (...args) {
    const out = onConnectionsChange?.apply(this, args);
    // After litegraph has finished the (dis)connection: never add or remove slots in the middle of it.
    setTimeout(() => fitImageInputs(this, specs), 0);
    return out;
  };
  return specs;
}
