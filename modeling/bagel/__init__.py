"""BAGEL-7B-MoT in plain PyTorch (no ComfyUI): MoT Qwen2 decoder, NaViT SigLIP, FLUX autoencoder, sampler.

Facts: backend_specs.md §1; behaviour follows ByteDance-Seed/Bagel (inferencer.py, modeling/bagel/*),
restated. Attention goes through PyTorch SDPA only.
"""
from .attention import KVCache
from .autoencoder import AutoEncoder
from .config import AEConfig, BagelConfig, ConfigError, LLMConfig, ViTConfig
from .flow import RENORM_TYPES
from .inference import BagelEngine, Contexts, FlowSettings, TokenIds, token_ids
from .model import Bagel

__all__ = ["AEConfig", "AutoEncoder", "Bagel", "BagelConfig", "BagelEngine", "ConfigError", "Contexts",
           "FlowSettings", "KVCache", "LLMConfig", "RENORM_TYPES", "TokenIds", "ViTConfig", "token_ids"]
