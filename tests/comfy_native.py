"""Comfy-format Qwen-Image files made and read by ComfyUI's OWN code, in a real ComfyUI's Python (issue 19).

    report = comfy_resave(comfy_dir, src_file, out_file)   # ComfyUI loads src_file and saves out_file

runs this file with ComfyUI's interpreter (``tests/comfy_server.comfy_python``). The child process loads the
transformer file with ``comfy.sd.load_diffusion_model`` (ComfyUI's UNETLoader path: prefix handling,
``convert_old_quants``, per-layer quantisation detection, its FP8 / mixed-precision ops) and writes it back as
``comfy.sd.save_checkpoint`` does (the ModelSave node's steps: ``model.diffusion_model.`` prefix, ComfyUI's own
``comfy_quant`` + ``weight_scale`` serialisation for quantised layers, ``comfy.utils.save_torch_file``). So

- ``out_file`` is a Comfy-format file produced independently of both the pack and tests/tiny_comfy.py's writers;
- the report says whether ComfyUI accepted ``src_file`` (missing / unexpected keys) and how far ComfyUI's
  dequantised weights are from a reference (the diffusers folder's transformer), which checks the writers' scale
  semantics against ComfyUI's.

One adaptation, printed in the report: ComfyUI's detection reads only ``in_channels`` and the block count from a
Qwen-Image file and assumes the 20B model's 24 heads and 3,584-wide text input; for the tiny widths the child
adds ``num_attention_heads`` (``img_in`` rows / 128) and ``joint_attention_dim`` (``txt_in`` columns) to the
detected config. Only the standard library at import time (the parent side runs in the test interpreter).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HEAD_DIM = 128  # Qwen-Image's attention head size (not in the file)
TIMEOUT_S = 300


def comfy_resave(comfy_dir: Path | str, src: Path | str, out: Path | str | None = None,
                 reference: Path | str | None = None, timeout: float = TIMEOUT_S) -> dict:
    """Load ``src`` with ComfyUI's loader (and save it to ``out`` with ComfyUI's saver); return the child's report.

    ``reference``: a safetensors file with the diffusers-named bf16 weights to compare ComfyUI's weights with.
    """
    from tests.comfy_server import comfy_python

    comfy_dir = Path(comfy_dir)
    cmd = [comfy_python(comfy_dir), str(Path(__file__).resolve()), "--comfy", str(comfy_dir), "--src", str(src)]
    if out is not None:
        cmd += ["--out", str(out)]
    if reference is not None:
        cmd += ["--reference", str(reference)]
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    import os

    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(comfy_dir),
                          env={**os.environ, **env})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("COMFY_NATIVE ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"ComfyUI child failed (rc {proc.returncode}) on {src}:\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("COMFY_NATIVE "):])


# --------------------------------------------------------------------------------------------------------------
# Child side (ComfyUI's interpreter)
# --------------------------------------------------------------------------------------------------------------

def _child(comfy_dir: str, src: str, out: str | None, reference: str | None) -> dict:
    import logging

    sys.path.insert(0, comfy_dir)
    import comfy.cli_args  # parses no command line unless comfy.options enables it (main.py does)

    comfy.cli_args.args.cpu = True
    import comfy.model_detection as md
    import comfy.sd

    warnings: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):  # ComfyUI reports missing / unexpected keys as warnings
            if record.levelno >= logging.WARNING:
                warnings.append(record.getMessage())

    logging.getLogger().addHandler(Collect())
    detect = md.detect_unet_config

    def detect_with_widths(state_dict, key_prefix, *args, **kwargs):
        config = detect(state_dict, key_prefix, *args, **kwargs)
        if config and config.get("image_model") == "qwen_image":
            config["num_attention_heads"] = state_dict[f"{key_prefix}img_in.weight"].shape[0] // HEAD_DIM
            config["joint_attention_dim"] = state_dict[f"{key_prefix}txt_in.weight"].shape[1]
        return config

    md.detect_unet_config = detect_with_widths
    patcher = comfy.sd.load_diffusion_model(src)
    if patcher is None:
        raise RuntimeError(f"ComfyUI did not recognise {src}")
    model = patcher.model.diffusion_model
    report: dict = {"comfy_dir": comfy_dir, "src": src, "warnings": warnings,
                    "adapted": ["num_attention_heads", "joint_attention_dim"],
                    "model_config": {k: v for k, v in patcher.model.model_config.unet_config.items()
                                     if isinstance(v, (int, str, float))}}
    if reference is not None:
        from safetensors.torch import load_file

        ref = load_file(reference)
        errs = {}
        for name, module in model.named_modules():
            w = getattr(module, "weight", None)
            if w is None or f"{name}.weight" not in ref:
                continue
            if hasattr(w, "_layout_cls"):  # comfy_kitchen QuantizedTensor (0.4+ mixed-precision ops)
                w = w.dequantize()
            elif getattr(module, "scale_weight", None) is not None:  # 0.3.x scaled_fp8_ops
                w = w.float() * module.scale_weight.float()
            r = ref[f"{name}.weight"].float()
            errs[name] = float((w.float() - r).norm() / r.norm().clamp(min=1e-12))
        report["max_rel_err"] = max(errs.values())
        report["compared"] = len(errs)
        report["missing_reference"] = sorted(k for k in ref if k.endswith(".weight")
                                             and k[: -len(".weight")] not in errs)
    if out is not None:
        # comfy.sd.save_checkpoint's steps (ModelSave): ComfyUI's state_dict_for_saving, then save_torch_file. A
        # quantised layer's weight is comfy_kitchen's QuantizedTensor, which safetensors cannot serialise on a CPU
        # (0.8.0: "Bad address"): it is written as its stored FP8 data (what ComfyUI's loader reads back).
        import comfy.model_management
        import comfy.utils

        comfy.model_management.load_models_gpu([patcher], force_patch_weights=True)
        sd = patcher.model.state_dict_for_saving(None, None, None)
        unwrapped = [k for k, t in sd.items() if hasattr(t, "_qdata")]
        sd = {k: (t._qdata if hasattr(t, "_qdata") else t).contiguous() for k, t in sd.items()}
        comfy.utils.save_torch_file(sd, out)
        report.update(out=out, unwrapped_quantized=len(unwrapped))
    return report


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--comfy", required=True)
    p.add_argument("--src", required=True)
    p.add_argument("--out")
    p.add_argument("--reference")
    a = p.parse_args(argv)
    report = _child(a.comfy, a.src, a.out, a.reference)
    print("COMFY_NATIVE " + json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
