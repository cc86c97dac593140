"""Qwen-Image pieces Gentor adds to diffusers' own (no ComfyUI imports).

- ``vae``: diffusers' Qwen-Image VAEs (1.x and 2.1), encoding and decoding still images without the video
  frame caches.
"""
