"""Emu3.5 / Emu3.5-Image in plain torch (no ComfyUI imports).

- ``tokens``: the fixed control-token ids and the official defaults.
- ``tokenizer``: the text tokenizer (tiktoken BPE + special and vision tokens numbered from 151643).
- ``decoder``: the LLM as transformers' ``Qwen3ForCausalLM`` built from the Emu3.5 config.
- ``ibq``: the IBQ vision tokenizer (taming-style encoder/decoder, dot-product argmax quantiser).
- ``image_tokens``: image <-> token-string formatting and parsing, the resize rule, the aspect presets.
- ``logits``: the structure rules, CFG in log-prob space and differential top-k/top-p.
- ``generate``: the KV-cached two-branch generation loop.
- ``placement``: the pure layer -> device planner.
"""
