"""DeepGen 1.0 (Qwen2.5-VL-3B + SD3.5-Medium-class DiT + stacked-channel bridge), pure torch.

Modules: ``bridge`` (meta queries, six-layer stacking, projectors, connector), ``transformer`` (the
"dynamic" SD3 forward with reference latents), ``prompts`` (templates and image preprocessing),
``encode`` (the VLM pass), ``sampling`` (flow-matching loop), ``checkpoint`` (reading and checking the
released files), ``convert`` (pickle -> safetensors) and ``cli`` (its command line). No ComfyUI imports here.
"""
