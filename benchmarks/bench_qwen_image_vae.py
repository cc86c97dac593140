"""Qwen-Image VAE decode: peak memory and time, whole vs tiled, at full size (issue 13).

Builds the REAL-size Qwen-Image VAE (``AutoencoderKLQwenImage`` with the released ``vae/config.json``: base_dim 96,
z_dim 16, dim_mult [1,2,4,4], num_res_blocks 2; 127 M parameters, random weights, nothing downloaded) and decodes
one square latent per size through Gentor's code path: ``qwen_image_vae.choose`` picks the mode ("off" -> whole,
"on" -> tiled + sliced), ``qwen_image_vae.apply`` switches the VAE, then the decode runs as diffusers'
QwenImagePipeline runs it (latents de-normalised with latents_mean/std, ``vae.decode`` under inference mode).

Each (size, mode) runs in its own fresh subprocess, one at a time. Memory on a CPU: the process's resident set
above its post-load baseline; the kernel's peak-RSS counter (VmHWM) is reset through ``/proc/self/clear_refs``
right before the decode, so the peak of building the model cannot hide the decode's (ru_maxrss is a lifetime
high-water mark and would). A 5 ms /proc sampling thread is reported beside it as a cross-check. With ``--gpu``:
``torch.cuda.max_memory_allocated`` above the allocation after loading (and the reserved peak). The estimate the
sampler plans with (``qwen_image_vae.decode_bytes``) is printed beside each measurement.

    python benchmarks/bench_qwen_image_vae.py [--sizes 1024 1328 2048] [--modes whole tiled]
                                              [--dtype fp32|bf16] [--threads 1] [--gpu] [--json out.json]

Measured 2026-11-30 on a 2-core AMD EPYC VM (23 GiB RAM), torch 2.14.1, diffusers 0.42.1, fp32 (bf16 conv3d on
this CPU runs > 40x slower than fp32, so it is no option here). GB = 1e9 B. The engine's class
(``StillImageQwenImageVAE``: one-frame decodes without diffusers' video frame caches) and, with
``--diffusers-class``, diffusers' own ``AutoencoderKLQwenImage``:

    size   whole: counted  CPU RSS   (diffusers: counted  CPU RSS)   tiled: counted  CPU RSS
     256            0.18     0.46                0.45     0.73                0.45     0.71
     512            0.71     1.04                1.82     2.31                0.46     0.78
    1024            2.83      -                  7.26     8.66                0.48      -
    1328            4.75      -                 12.20    14.29                0.49      -
    2048           11.29      -                 29.01   not run               0.54     0.87

"counted" = --simulate (allocations, fp32; bf16 halves them); "CPU RSS" = VmHWM above the post-load RSS (the 5 ms
sampler agreed within 0.3 MB). Wall time with 1 thread: 256 px whole 14 s (diffusers' class 58 s), 512 px 59 s
(246 s); 2048 px tiled 4737 s (121 tiles) with 2 threads. The estimate (``decode_bytes``) is printed beside each row.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The released Qwen/Qwen-Image vae/config.json (reference backend_specs.md §4.2).
REAL_VAE_CONFIG = dict(
    base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
    temperal_downsample=[False, True, True], dropout=0.0,
    latents_mean=[-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517,
                  -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
    latents_std=[2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579,
                 1.6382, 1.1253, 2.8251, 1.9160])
SPATIAL = 8  # the VAE's spatial compression
MODES = {"whole": "off", "tiled": "on"}  # benchmark mode -> the vae_tiling setting that selects it
DTYPES = ("fp32", "bf16")
SAMPLE_S = 0.005
DIFFUSERS_CLASS_ENV = "GENTOR_BENCH_DIFFUSERS_VAE"  # set in a child: decode with diffusers' own class
GB = 1e9


def import_pack():
    """The pack under the alias ``gentor`` (its folder may be named comfyui-gentor, which is not importable)."""
    spec = importlib.util.spec_from_file_location("gentor", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["gentor"] = module
    spec.loader.exec_module(module)
    from gentor.samplers import qwen_image_vae  # noqa: PLC0415

    return qwen_image_vae


# ----------------------------------------------------------------------------- child: one decode
def _proc_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False when the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _proc_kib("VmHWM") <= _proc_kib("VmRSS") + 1024  # within 1 MiB: the counter really restarted


class RssSampler(threading.Thread):
    """Highest VmRSS seen every SAMPLE_S seconds (a cross-check of VmHWM; it can miss short spikes)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_kib = _proc_kib("VmRSS")
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak_kib = max(self.peak_kib, _proc_kib("VmRSS"))
            time.sleep(SAMPLE_S)


def live_bytes_tracker():
    """A dispatch mode that counts the bytes of live tensor storages after every op and keeps the peak: what an
    allocator without caching or workspaces would hold (torch.cuda.max_memory_allocated counts the same, plus
    rounding). Run on the meta device it measures a decode's allocations without computing it."""
    import torch  # noqa: PLC0415
    from torch.multiprocessing.reductions import StorageWeakRef  # noqa: PLC0415
    from torch.utils._python_dispatch import TorchDispatchMode  # noqa: PLC0415
    from torch.utils._pytree import tree_leaves  # noqa: PLC0415

    class LiveBytes(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.live: dict[int, tuple[StorageWeakRef, int]] = {}
            self.peak = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            out = func(*args, **(kwargs or {}))
            # Drop freed storages first: a new storage may reuse a freed one's address (its key).
            self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    storage = t.untyped_storage()
                    ref = StorageWeakRef(storage)
                    self.live.setdefault(ref.cdata, (ref, storage.nbytes()))  # views and in-place ops add nothing
            self.peak = max(self.peak, sum(n for _, n in self.live.values()))
            return out

    return LiveBytes()


def child(size: int, mode: str, dtype_name: str, device: str, threads: int) -> dict:
    import torch  # noqa: PLC0415

    vae_tiling = import_pack()
    # The class the engine loads: diffusers' VAE minus the video frame caches on one-frame decodes
    # (``--diffusers-class`` measures diffusers' own class instead).
    from gentor.modeling.qwen_image.vae import StillImageQwenImageVAE  # noqa: PLC0415
    from diffusers import AutoencoderKLQwenImage  # noqa: PLC0415

    vae_cls = AutoencoderKLQwenImage if os.environ.get(DIFFUSERS_CLASS_ENV) else StillImageQwenImageVAE
    torch.set_num_threads(threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    torch.manual_seed(0)
    if device == "meta":
        with torch.device("meta"):
            vae = vae_cls(**REAL_VAE_CONFIG).eval().to(dtype)
    else:
        vae = vae_cls(**REAL_VAE_CONFIG).eval().to(device, dtype)
    # Gentor's path: the setting -> choose -> apply on the (shared) VAE module, exactly as the engines call it.
    tiled, note = vae_tiling.choose(MODES[mode], untiled_fits=True)
    vae_tiling.apply(vae, tiled)
    cfg = vae.config
    side = size // SPATIAL
    latents = (torch.randn(1, cfg.z_dim, 1, side, side, device="meta", dtype=dtype) if device == "meta" else
               torch.randn(1, cfg.z_dim, 1, side, side, generator=torch.Generator().manual_seed(1)).to(device, dtype))
    mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(device, dtype)
    inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(device, dtype)
    gc.collect()
    sampler = None
    tracker = live_bytes_tracker() if device == "meta" else contextlib.nullcontext()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_alloc = torch.cuda.memory_allocated()
    elif device == "cpu":
        hwm_reset = _reset_peak_rss()
        base_rss = _proc_kib("VmRSS") * 1024
        sampler = RssSampler()
        sampler.start()
    t0 = time.perf_counter()
    with torch.inference_mode(), tracker:
        image = vae.decode(latents / inv_std + mean, return_dict=False)[0][:, :, 0]  # as QwenImagePipeline
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    out = {"size": size, "mode": mode, "class": vae_cls.__name__, "tiled": tiled, "note": note, "dtype": dtype_name,
           "device": device, "threads": threads, "seconds": round(seconds, 2), "shape": list(image.shape),
           "finite": None if device == "meta" else bool(torch.isfinite(image).all()),
           "output_bytes": image.numel() * image.element_size()}
    if device == "cuda":
        out.update(method="torch.cuda.max_memory_allocated - memory_allocated after load",
                   peak_above_baseline_bytes=torch.cuda.max_memory_allocated() - base_alloc,
                   peak_reserved_bytes=torch.cuda.max_memory_reserved(), baseline_bytes=base_alloc)
    elif device == "meta":
        out.update(method="simulated: live tensor storages at op boundaries (meta device, nothing computed)",
                   peak_above_baseline_bytes=tracker.peak)
    else:
        sampler.stop.set()
        sampler.join()
        hwm = _proc_kib("VmHWM") * 1024
        out.update(method="VmHWM (reset via /proc/self/clear_refs) - VmRSS after load" if hwm_reset else
                   "5 ms VmRSS sampling - VmRSS after load (clear_refs refused)",
                   peak_above_baseline_bytes=(hwm if hwm_reset else sampler.peak_kib * 1024) - base_rss,
                   sampled_peak_above_baseline_bytes=sampler.peak_kib * 1024 - base_rss, baseline_bytes=base_rss)
    return out


# ----------------------------------------------------------------------------- parent: one subprocess each
def run_one(size: int, mode: str, args: argparse.Namespace) -> dict:
    device = "meta" if args.simulate else "cuda" if args.gpu else "cpu"
    cmd = [sys.executable, __file__, "--child", str(size), mode, args.dtype, device, str(args.threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    if args.diffusers_class:
        env[DIFFUSERS_CLASS_ENV] = "1"
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        return {"size": size, "mode": mode, "error": last, "returncode": proc.returncode}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def with_estimate(row: dict, vae_tiling) -> dict:
    itemsize = 4 if row.get("dtype", "fp32") == "fp32" else 2
    still = row.get("class") != "AutoencoderKLQwenImage"  # the engine's class unless --diffusers-class
    est = vae_tiling.decode_bytes(row["size"], row["size"], 1, REAL_VAE_CONFIG["base_dim"], itemsize,
                                  row["mode"] == "tiled",
                                  vae_tiling.STILL_IMAGE_DECODE_FACTOR if still else vae_tiling.VAE_DECODE_FACTOR)
    row["estimate_bytes"] = est
    if "peak_above_baseline_bytes" in row:
        row["measured_over_estimate"] = round(row["peak_above_baseline_bytes"] / est, 3)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", nargs=5, metavar=("SIZE", "MODE", "DTYPE", "DEVICE", "THREADS"), help=argparse.SUPPRESS)
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 1328, 2048])
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    p.add_argument("--dtype", choices=DTYPES, default=None, help="fp32 on a CPU, bf16 on a GPU by default")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads of each decode")
    p.add_argument("--gpu", action="store_true", help="decode on CUDA and report torch.cuda peak memory")
    p.add_argument("--diffusers-class", action="store_true",
                   help="diffusers' AutoencoderKLQwenImage (with its frame caches) instead of the engine's class")
    p.add_argument("--simulate", action="store_true",
                   help="count the decode's tensor allocations on the meta device instead (seconds, any size)")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args()
    if args.child:
        size, mode, dtype, device, threads = args.child
        print(json.dumps(child(int(size), mode, dtype, device, int(threads))))
        return 0
    if args.gpu:
        import torch  # noqa: PLC0415

        if not torch.cuda.is_available():
            p.error("--gpu: no CUDA device here")
    args.dtype = args.dtype or ("bf16" if args.gpu else "fp32")
    vae_tiling = import_pack()
    rows = []
    for size in args.sizes:
        for mode in args.modes:  # one decode at a time: never two full-size decodes in memory together
            row = with_estimate(run_one(size, mode, args), vae_tiling)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.json:
                args.json.write_text(json.dumps(rows, indent=2))
    print(f"{'size':>6} {'mode':>6} {'peak GB':>8} {'est GB':>7} {'ratio':>6} {'s':>8}")
    for r in rows:
        peak = r.get("peak_above_baseline_bytes")
        print(f"{r['size']:>6} {r['mode']:>6} {peak / GB if peak is not None else float('nan'):>8.2f} "
              f"{r['estimate_bytes'] / GB:>7.2f} {r.get('measured_over_estimate', float('nan')):>6} "
              f"{r.get('seconds', float('nan')):>8}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
