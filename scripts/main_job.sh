#!/usr/bin/env bash
# The main job on a fresh machine: run the Qwen-Image text-to-image example headless through ComfyUI.
#
#   bash scripts/main_job.sh /path/to/ComfyUI [OUT_DIR]
#
# 1. installs the pack's requirements into that ComfyUI's Python (its venv if it has one);
# 2. starts ComfyUI headless on 127.0.0.1 with this pack (from a scratch base directory, so the
#    checkout is not modified) and the user's models folder;
# 3. uses a real Qwen-Image pipeline from ComfyUI/models/qwen_image/ when there is one, otherwise writes
#    the tiny random-weight models (no download) and uses those;
# 4. queues workflows/api/qwen_image_t2i.json through the HTTP API with the headless client and saves the
#    image into OUT_DIR (default: ./gentor-out); then stops ComfyUI and removes its scratch folder (the
#    server's log is kept as OUT_DIR/comfyui.log).
#
# Environment: GENTOR_PORT (default: a free loopback port, so a ComfyUI already running on 8188/8189 is
# never hit), GENTOR_NO_INSTALL=1 (skip step 1 when the requirements are already installed).
set -euo pipefail
COMFY="${1:?usage: bash scripts/main_job.sh /path/to/ComfyUI [OUT_DIR]}"
COMFY="$(cd "$COMFY" && pwd)"
OUT="$(mkdir -p "${2:-gentor-out}" && cd "${2:-gentor-out}" && pwd)"
PACK="$(cd "$(dirname "$0")/.." && pwd)"
[ -f "$COMFY/main.py" ] || { echo "no ComfyUI checkout at $COMFY (expected main.py there)" >&2; exit 2; }

PY=python3
for cand in "$COMFY/.venv/bin/python" "$COMFY/venv/bin/python" "$COMFY/../python_embeded/python"; do
  if [ -x "$cand" ]; then PY="$cand"; break; fi
done
echo "[gentor] ComfyUI Python: $PY"
if [ "${GENTOR_NO_INSTALL:-0}" != 1 ]; then "$PY" -m pip install -q -r "$PACK/requirements.txt"; fi
PORT="${GENTOR_PORT:-$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/gentor-main.XXXXXX")"
SERVER=""
cleanup() {
  if [ -n "$SERVER" ]; then kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true; fi
  [ -f "$WORK/comfyui.log" ] && cp "$WORK/comfyui.log" "$OUT/comfyui.log"
  rm -rf "$WORK"
}
trap cleanup EXIT
# user/ holds ComfyUI's settings and its database (by default the database would go to the checkout's user/,
# which a fresh clone lacks: "Failed to initialize database").
mkdir -p "$WORK/custom_nodes" "$WORK/input" "$WORK/output" "$WORK/user"
ln -s "$PACK" "$WORK/custom_nodes/comfyui-gentor"
MODEL_ARGS=()
# A real pipeline is told from a tiny or partial one by its weights, never by its folder name: the
# transformer's safetensors headers must describe at least MIN_REAL_PARAMS parameters.
REAL="$("$PY" - "$COMFY/models/qwen_image" <<'EOF'
import json, struct, sys
from pathlib import Path
MIN_REAL_PARAMS = 1_000_000_000  # Qwen-Image's transformer has ~20 B; the tiny test kit's far fewer
root = Path(sys.argv[1])

def params(folder):
    total = 0
    for f in folder.glob("*.safetensors"):
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for key, meta in header.items():
            if key != "__metadata__":
                count = 1
                for dim in meta["shape"]:
                    count *= dim
                total += count
    return total

for d in sorted(root.glob("*/")) if root.is_dir() else []:
    try:
        if json.loads((d / "model_index.json").read_text()).get("_class_name") != "QwenImagePipeline":
            continue
        if params(d / "transformer") >= MIN_REAL_PARAMS:
            print(d.name)
            break
        print(f"[gentor] skipping models/qwen_image/{d.name}: its transformer weights hold too few "
              "parameters for a real Qwen-Image", file=sys.stderr)
    except (OSError, ValueError, KeyError, struct.error) as exc:
        print(f"[gentor] skipping models/qwen_image/{d.name}: unreadable ({exc})", file=sys.stderr)
EOF
)"
if [ -n "$REAL" ]; then
  echo "[gentor] using real model models/qwen_image/$REAL (real sizes: steps/size 0 = defaults)"
  MODEL_ARGS=(--set "1.model_name=$REAL" --set 3.steps=0 --set 3.width=0 --set 3.height=0)
  BASE="$COMFY/models"
else
  echo "[gentor] no Qwen-Image pipeline in $COMFY/models/qwen_image: writing the tiny random-weight models"
  (cd "$PACK" && "$PY" -m tests.tiny_models --out "$WORK/models" --backend qwen_image)
  BASE="$WORK/models"
fi
cat > "$WORK/extra_model_paths.yaml" <<EOF
gentor:
  base_path: $BASE
  qwen_image: qwen_image/
EOF
DEVICE_ARGS=()
"$PY" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" || DEVICE_ARGS=(--cpu)
echo "[gentor] starting ComfyUI on 127.0.0.1:$PORT (log: $OUT/comfyui.log when it stops)"
(cd "$COMFY" && exec "$PY" main.py "${DEVICE_ARGS[@]}" --listen 127.0.0.1 --port "$PORT" --disable-auto-launch \
  --base-directory "$WORK" --extra-model-paths-config "$WORK/extra_model_paths.yaml" \
  --database-url "sqlite:///$WORK/user/comfyui.db") >"$WORK/comfyui.log" 2>&1 &
SERVER=$!
for _ in $(seq 1 180); do
  curl -sf "http://127.0.0.1:$PORT/object_info/GentorTextToImage" >/dev/null 2>&1 && break
  kill -0 $SERVER 2>/dev/null || { tail -40 "$WORK/comfyui.log"; exit 1; }
  sleep 1
done
"$PY" "$PACK/headless.py" run "$PACK/workflows/api/qwen_image_t2i.json" --server "http://127.0.0.1:$PORT" \
  --out "$OUT" "${MODEL_ARGS[@]}"
echo "[gentor] done: images in $OUT"
ls -l "$OUT"
