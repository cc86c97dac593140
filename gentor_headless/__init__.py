"""Gentor headless client: queue ComfyUI workflows through the HTTP API, one run or a whole dataset.

Stdlib only, plus ``websocket-client`` when installed (otherwise it polls ``/history``). It does not
import ComfyUI, so it runs on any machine that can reach a ComfyUI server.
"""
from __future__ import annotations

__version__ = "0.1.0"
