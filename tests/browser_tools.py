"""The tools the browser tests drive ComfyUI's frontend with, found one way for every test:

- ``node``;
- Debian's Chromium (``$CHROMIUM``, else ``chromium`` / ``chromium-browser`` on PATH) — never a downloaded
  browser build;
- npm's ``playwright-core`` (a driver only): ``$GENTOR_PLAYWRIGHT_CORE`` (its package folder, as the README
  says), else whatever ``node`` resolves through ``NODE_PATH`` or the global npm root.

The scripts get the driver's folder as an argument and ``require`` it from there, so no NODE_PATH is needed.
"""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser")
PLAYWRIGHT_ENV = "GENTOR_PLAYWRIGHT_CORE"
PROBE_TIMEOUT_S = 60


def node() -> str | None:
    return shutil.which("node")


def chromium() -> str | None:
    return os.environ.get("CHROMIUM") or next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


@functools.lru_cache(maxsize=None)
def _resolved_by_node(node_path: str) -> str | None:
    exe = node()
    if exe is None:
        return None
    paths = [p for p in node_path.split(os.pathsep) if p]
    npm = shutil.which("npm")
    if npm:
        root = subprocess.run([npm, "root", "-g"], capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
        if root.returncode == 0 and root.stdout.strip():
            paths.append(root.stdout.strip())
    found = subprocess.run([exe, "-e", "console.log(require.resolve('playwright-core/package.json'))"],
                           env={**os.environ, "NODE_PATH": os.pathsep.join(paths)}, capture_output=True,
                           text=True, timeout=PROBE_TIMEOUT_S)
    out = found.stdout.strip()
    return str(Path(out).parent) if found.returncode == 0 and out else None


def playwright_core() -> str | None:
    """The playwright-core package folder: $GENTOR_PLAYWRIGHT_CORE when set (it must hold package.json),
    else node's own resolution (NODE_PATH, the global npm root)."""
    configured = os.environ.get(PLAYWRIGHT_ENV)
    if configured:
        folder = Path(configured).expanduser()
        return str(folder) if (folder / "package.json").is_file() else None
    return _resolved_by_node(os.environ.get("NODE_PATH", ""))


def missing() -> str | None:
    """Why the browser tests cannot run here (None: they can)."""
    if node() is None:
        return "node is not installed (apt-get install nodejs): the frontend cannot be driven"
    if chromium() is None:
        return "Debian's chromium is not installed (apt-get install chromium, or set CHROMIUM to its path)"
    if playwright_core() is None:
        configured = os.environ.get(PLAYWRIGHT_ENV)
        if configured:
            return f"{PLAYWRIGHT_ENV}={configured} holds no package.json: point it at the playwright-core folder"
        return (f"npm's playwright-core is not found: npm install --prefix ~/gentor-tools playwright-core and set "
                f"{PLAYWRIGHT_ENV}=~/gentor-tools/node_modules/playwright-core (or NODE_PATH)")
    return None
