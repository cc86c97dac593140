"""The README's setup as a new user follows it, against a real ComfyUI (COMFYUI_DIR):

- the tiny-model kit's output, reached through the README's own ``extra_model_paths.yaml`` block (only its
  ``base_path`` changed), offers every model and LoRA name the example workflows use, and the LoRA example
  runs (a README without ``loras:`` gave "not in []");
- the test server is isolated from the user's own ``ComfyUI/extra_model_paths.yaml``, which ComfyUI's main.py
  always reads: a checkout holding one with other models must not change what the dropdowns offer.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.comfy_server import ComfyServer, comfy_dir_or_skip, describe, folder_keys, status_of

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
API_DIR = ROOT / "workflows" / "api"
USERS_PREFIX = "users-own-"  # names only the decoy user configuration offers
RUN_TIMEOUT_S = 300.0
# Loaders of ComfyUI's own single files: their examples need the opt-in kit (--backend qwen_image_comfy, about
# 1 GB) in ComfyUI's own folders, as the README's "Already have Qwen-Image in ComfyUI?" says.
OPT_IN_LOADERS = {"GentorLoadQwenImageFiles"}


def readme_yaml() -> str:
    """The README's extra_model_paths.yaml example (the yaml block of "Models on another disk")."""
    text = README.read_text(encoding="utf-8")
    blocks = re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 1, f"expected one yaml block in the README, found {len(blocks)}"
    return blocks[0]


def with_base_path(yaml_text: str, base: Path) -> str:
    out, n = re.subn(r"(?m)^(\s+base_path:\s*)\S+", lambda m: m.group(1) + json.dumps(str(base)), yaml_text)
    assert n == 1, yaml_text
    return out


def test_readme_yaml_maps_every_folder_the_kit_writes(tiny_root: Path):
    yaml = pytest.importorskip("yaml")
    (section,) = yaml.safe_load(readme_yaml()).values()
    mapped = {v.strip("/") for k, v in section.items() if k != "base_path"}
    written = {p.name for p in Path(tiny_root).iterdir() if p.is_dir() and not p.name.startswith(".")}
    assert written <= mapped, f"the README's yaml lacks {sorted(written - mapped)}"
    assert all(section.get(key) == f"{key}/" for key in written), section


def _users_checkout(comfy_dir: Path, dest: Path, tiny_root: Path) -> Path:
    """A ComfyUI checkout (links to the real one, main.py copied as in a clone) whose own
    extra_model_paths.yaml points at the user's other models: a copy of one model per folder key under
    another name."""
    dest.mkdir()
    for entry in comfy_dir.iterdir():
        if entry.name == "main.py":
            shutil.copy2(entry, dest / entry.name)
        elif entry.name != "extra_model_paths.yaml":
            (dest / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    users = dest.parent / "users-models"
    for key_dir in sorted(p for p in Path(tiny_root).iterdir() if p.is_dir()):
        first = sorted(p for p in key_dir.iterdir() if not p.name.startswith("."))[0]
        (users / key_dir.name).mkdir(parents=True)
        (users / key_dir.name / f"{USERS_PREFIX}{first.name}").symlink_to(first.resolve(),
                                                                         target_is_directory=first.is_dir())
    lines = ["users_own:", f"    base_path: {json.dumps(str(users))}"]
    lines += [f"    {key}: {key}/" for key in dict.fromkeys([*folder_keys(), "loras"])]
    (dest / "extra_model_paths.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return dest


@pytest.fixture(scope="module")
def readme_server(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory):
    comfy_dir = comfy_dir_or_skip()
    tmp = tmp_path_factory.mktemp("newcomer")
    checkout = _users_checkout(comfy_dir, tmp / "ComfyUI", Path(tiny_root))
    inputs = sorted((ROOT / "workflows" / "inputs").glob("*.png"))
    srv = ComfyServer(checkout, tmp / "base", input_images=inputs,
                      extra_model_paths=with_base_path(readme_yaml(), Path(tiny_root)))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def combo_options(spec: list) -> list | None:
    """A combo's options in /object_info (V3: ["COMBO", {"options": [...]}]; V1: [[...], {...}])."""
    if spec and spec[0] == "COMBO":
        return spec[1].get("options", [])
    return spec[0] if spec and isinstance(spec[0], list) else None


def gentor_combos(object_info: dict) -> dict[tuple[str, str], list]:
    combos = {}
    for node_id, info in object_info.items():
        if not node_id.startswith("Gentor"):
            continue
        for section in ("required", "optional"):
            for name, spec in (info.get("input", {}).get(section) or {}).items():
                options = combo_options(spec)
                if options is not None:
                    combos[node_id, name] = options
    return combos


def test_every_example_name_resolves_through_the_readme_yaml(readme_server):
    combos = gentor_combos(readme_server.object_info())
    missing = []
    for path in sorted(API_DIR.glob("*.json")):
        prompt = json.loads(path.read_text())
        if any(node["class_type"] in OPT_IN_LOADERS for node in prompt.values()):
            continue
        for node_id, node in prompt.items():
            for name, value in node["inputs"].items():
                options = combos.get((node["class_type"], name))
                if options is not None and isinstance(value, str) and value not in options:
                    missing.append(f"{path.name} node {node_id} {node['class_type']}.{name}={value!r} not in {options}")
    assert not missing, "\n".join(missing)


def test_users_own_extra_model_paths_is_not_read(readme_server):
    offered = {o for options in gentor_combos(readme_server.object_info()).values() for o in options}
    users = sorted(o for o in offered if isinstance(o, str) and USERS_PREFIX in o)
    assert not users, f"the test server read the checkout's own extra_model_paths.yaml: {users}"
    assert "users-models" not in readme_server.log_text()  # ComfyUI logs each extra search path it adds


def test_no_database_error_in_the_log(readme_server):
    assert "Failed to initialize database" not in readme_server.log_text()


def test_lora_example_runs_through_the_readme_yaml(readme_server):
    api = json.loads((API_DIR / "qwen_image_lora.json").read_text())
    entry = readme_server.run(api, RUN_TIMEOUT_S)
    assert status_of(entry) == "success", describe(entry)


def _emu35_t2i(width: int, height: int) -> dict:
    api = json.loads((API_DIR / "emu35_t2i.json").read_text())
    (node,) = [n for n in api.values() if n["class_type"] == "GentorTextToImage"]
    node["inputs"].update(width=width, height=height)
    return api


def test_emu35_one_token_wide_image_runs_and_a_too_small_grid_is_named(readme_server):
    """Width 16 (one token per row) runs, previews and all; a grid below what the vision tokenizer handles
    fails naming width/height and the smallest size, never with torch's own GroupNorm message."""
    entry = readme_server.run(_emu35_t2i(16, 48), RUN_TIMEOUT_S)
    assert status_of(entry) == "success", describe(entry)
    (image,) = readme_server.output_images(entry, "4")
    assert image.size == (16, 48)
    entry = readme_server.run(_emu35_t2i(16, 16), RUN_TIMEOUT_S)
    assert status_of(entry) == "error"
    message = describe(entry)
    assert "Emu3.5 width/height: a 16x16 image is 1 token(s)" in message and "32x16 or 16x32" in message, message
    assert "per channel" not in message, message


def test_edit_image_tooltip_names_each_backends_reference_limit(readme_server):
    from tests.comfy_server import pack_registry

    info = readme_server.object_info()["GentorEditImage"]["input"]["optional"]
    tooltip = info["image_1"][1]["tooltip"]
    for spec in pack_registry().BACKENDS:
        if spec.max_references:
            assert f"{spec.display_name} {spec.max_references}" in tooltip, tooltip
