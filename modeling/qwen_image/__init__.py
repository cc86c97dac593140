"""Qwen-Image pieces Gentor adds to diffusers' own (no ComfyUI imports).

- ``vae``: diffusers' Qwen-Image VAE, encoding and decoding still images without the video frame caches.
"""
