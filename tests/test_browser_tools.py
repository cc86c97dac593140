"""How the browser tests find playwright-core: $GENTOR_PLAYWRIGHT_CORE (documented in the README) wins."""
from __future__ import annotations

import json

from tests import browser_tools


def test_documented_variable_names_the_driver_folder(tmp_path, monkeypatch):
    driver = tmp_path / "node_modules" / "playwright-core"
    driver.mkdir(parents=True)
    (driver / "package.json").write_text(json.dumps({"name": "playwright-core"}))
    monkeypatch.setenv("GENTOR_PLAYWRIGHT_CORE", str(driver))
    monkeypatch.delenv("NODE_PATH", raising=False)
    assert browser_tools.playwright_core() == str(driver)


def test_a_wrong_folder_is_named_in_the_skip_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("GENTOR_PLAYWRIGHT_CORE", str(tmp_path))
    monkeypatch.setattr(browser_tools, "node", lambda: "/usr/bin/node")
    monkeypatch.setattr(browser_tools, "chromium", lambda: "/usr/bin/chromium")
    assert browser_tools.playwright_core() is None
    assert f"GENTOR_PLAYWRIGHT_CORE={tmp_path} holds no package.json" in browser_tools.missing()
