"""Headless client protocol, workflow handling and the `run` command, against a fake ComfyUI (no ComfyUI)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gentor_headless.cli import main  # noqa: E402
from gentor_headless.client import ComfyClient, execution_seconds, output_files  # noqa: E402
from gentor_headless.convert import ui_to_api  # noqa: E402
from gentor_headless.errors import ConversionError, ExecutionFailed, PromptRejected, ServerDown, \
    WorkflowError  # noqa: E402
from gentor_headless.workflow import apply_sets, parse_target  # noqa: E402
from tests.headless_helpers import FAKE_OBJECT_INFO, PNG_MAGIC, FakeComfy, free_port, \
    trivial_workflow, wait_for  # noqa: E402


@pytest.fixture
def fake():
    with FakeComfy() as server:
        yield server


def sampler_workflow() -> dict:
    wf = trivial_workflow()
    wf["3"] = {"class_type": "FakeSampler", "_meta": {"title": "Sampler"},
               "inputs": {"image": ["1", 0], "seed": 7, "steps": 3, "text": "a cat", "mode": "a"}}
    wf["2"]["inputs"]["images"] = ["3", 0]
    return wf


# ----------------------------------------------------------------------------- client protocol
@pytest.mark.parametrize("use_ws", [True, False])
def test_queue_follow_history_and_view(fake, use_ws):
    client = ComfyClient(fake.url, use_websocket=use_ws)
    events = []
    pid = client.queue_prompt(sampler_workflow())
    entry = client.wait(pid, timeout=10, on_event=lambda kind, data: events.append((kind, data)))
    files = output_files(entry)
    assert [f["filename"] for f in files] == ["t_00001_.png"]
    assert client.view(files[0]["filename"]).startswith(PNG_MAGIC)
    assert execution_seconds(entry) is not None
    if use_ws:
        assert [d["value"] for k, d in events if k == "progress"] == [1, 2, 3]
        assert ("executing", {"node": None, "prompt_id": pid}) in events
    else:
        assert not any(p.startswith("/ws") for _, p in fake.requests)
    client.close()


def test_falls_back_to_polling_without_websocket():
    with FakeComfy(websocket=False) as fake:
        client = ComfyClient(fake.url)
        entry = client.wait(client.queue_prompt(trivial_workflow()), timeout=10)
        assert entry["status"]["status_str"] == "success"
        assert client.use_websocket is False
        client.close()


def test_validation_error_carries_node_errors(fake):
    wf = trivial_workflow()
    wf["1"]["inputs"]["width"] = 99999
    with pytest.raises(PromptRejected) as info:
        ComfyClient(fake.url).queue_prompt(wf)
    text = str(info.value)
    assert "Prompt outputs failed validation" in text
    assert "* EmptyImage 1:" in text and "  - Value bigger than max: width, 99999 > 4096" in text
    assert info.value.node_errors["1"]["class_type"] == "EmptyImage"


def test_unknown_class_is_reported_as_comfyui_says(fake):
    with pytest.raises(PromptRejected, match="node NoSuchNode does not exist"):
        ComfyClient(fake.url).queue_prompt({"1": {"class_type": "NoSuchNode", "inputs": {}}})


def test_execution_error_names_node_and_exception(fake):
    wf = sampler_workflow()
    wf["3"]["inputs"]["text"] = "FAIL_ALWAYS"
    client = ComfyClient(fake.url)
    with pytest.raises(ExecutionFailed) as info:
        client.wait(client.queue_prompt(wf), timeout=10)
    assert "raised RuntimeError: forced failure" in str(info.value)
    assert info.value.details["traceback"]


def test_upload_is_multipart(fake):
    client = ComfyClient(fake.url)
    assert client.upload_image(b"\x00\x01binary", "pic 1.png") == "pic 1.png"
    assert fake.uploads["pic 1.png"] == b"\x00\x01binary"


def test_server_down_is_clear():
    client = ComfyClient(f"http://127.0.0.1:{free_port()}", timeout=2)
    with pytest.raises(ServerDown, match="not reachable.*Check that it is running"):
        client.queue_prompt(trivial_workflow())


def test_server_vanishing_mid_prompt_raises_server_down():
    fake = FakeComfy(delay=5)
    client = ComfyClient(fake.url, timeout=2)
    pid = client.queue_prompt(trivial_workflow())
    fake.kill()
    with pytest.raises(ServerDown):
        client.wait(pid, timeout=10)


def test_interrupt_targets_prompt(fake):
    fake.delay = 5
    client = ComfyClient(fake.url)
    pid = client.queue_prompt(trivial_workflow())
    assert wait_for(lambda: fake._running == pid, timeout=5)
    client.interrupt(pid)
    with pytest.raises(ExecutionFailed) as info:
        client.wait(pid, timeout=10)
    assert info.value.interrupted and fake.interrupts == [pid] and fake.deleted == [pid]


# ----------------------------------------------------------------------------- --set / targets
def test_set_coerces_to_input_type():
    wf = sampler_workflow()
    apply_sets(wf, ["3.steps=12", "Sampler.text=a dog", "1.width=32"])
    assert wf["3"]["inputs"]["steps"] == 12 and wf["3"]["inputs"]["text"] == "a dog"
    with pytest.raises(WorkflowError, match=r"'x' is not an integer"):
        apply_sets(wf, ["3.steps=x"])


def test_unknown_node_lists_nodes_and_inputs():
    with pytest.raises(WorkflowError) as info:
        parse_target(sampler_workflow(), "9.seed")
    text = str(info.value)
    assert "no node with id or title '9'" in text
    assert '3 FakeSampler "Sampler": image (linked), seed, steps, text, mode' in text
    assert "1 EmptyImage: width, height, batch_size, color" in text


def test_unknown_input_lists_inputs():
    with pytest.raises(WorkflowError, match=r"has no input 'sede'.*inputs are: image, seed, steps, text, mode"):
        parse_target(sampler_workflow(), "3.sede")


def test_linked_input_is_refused():
    with pytest.raises(WorkflowError, match="is connected to node 1 EmptyImage"):
        parse_target(sampler_workflow(), "3.image")


# ----------------------------------------------------------------------------- UI -> API
def ui_workflow() -> dict:
    """EmptyImage -> Reroute -> bypassed PreviewImage? no: -> FakeSampler -> SaveImage, plus extras."""
    nodes = [
        {"id": 1, "type": "EmptyImage", "mode": 0, "inputs": [], "widgets_values": [64, 32, 1, 0]},
        {"id": 2, "type": "Reroute", "mode": 0, "inputs": [{"name": "", "type": "*", "link": 1}]},
        {"id": 3, "type": "FakeSampler", "mode": 0, "title": "My sampler",
         "inputs": [{"name": "image", "type": "IMAGE", "link": 2},
                    {"name": "extra", "type": "IMAGE", "link": 5},
                    {"name": "steps", "type": "INT", "link": 6, "widget": {"name": "steps"}}],
         "widgets_values": [42, "randomize", 9, "hello", "b", 0.5]},
        {"id": 4, "type": "SaveImage", "mode": 0, "inputs": [{"name": "images", "type": "IMAGE", "link": 4}],
         "widgets_values": ["ui"]},
        {"id": 5, "type": "EmptyImage", "mode": 2, "inputs": [], "widgets_values": [8, 8, 1, 0]},
        {"id": 6, "type": "PrimitiveNode", "mode": 0, "inputs": [], "widgets_values": [9, "fixed"]},
        {"id": 7, "type": "Note", "mode": 0, "widgets_values": ["a note"]},
        {"id": 8, "type": "FakeSampler", "mode": 4,
         "inputs": [{"name": "image", "type": "IMAGE", "link": 3}],
         "widgets_values": [1, "fixed", 1, "bypassed", "a", 1.0]},
    ]
    links = [[1, 1, 0, 2, 0, "IMAGE"], [2, 2, 0, 3, 0, "IMAGE"], [3, 3, 0, 8, 0, "IMAGE"],
             [4, 8, 0, 4, 0, "IMAGE"], [5, 5, 0, 3, 1, "IMAGE"], [6, 6, 0, 3, 2, "INT"]]
    return {"nodes": nodes, "links": links, "version": 0.4}


def test_ui_to_api_matches_frontend_rules():
    api = ui_to_api(ui_workflow(), FAKE_OBJECT_INFO)
    assert set(api) == {"1", "3", "4"}
    assert api["1"]["inputs"] == {"width": 64, "height": 32, "batch_size": 1, "color": 0}
    assert api["3"] == {"class_type": "FakeSampler", "_meta": {"title": "My sampler"},
                        "inputs": {"image": ["1", 0], "seed": 42, "steps": 9, "text": "hello", "mode": "b",
                                   "strength": 0.5}}
    assert api["4"]["inputs"] == {"images": ["3", 0], "filename_prefix": "ui"}  # through the bypassed node


def test_ui_conversion_refuses_unknown_nodes_and_subgraphs():
    ui = ui_workflow()
    ui["nodes"].append({"id": 9, "type": "SomePackNode", "mode": 0, "widgets_values": []})
    ui["nodes"].append({"id": 10, "type": "1234-abcd", "mode": 0})
    ui["definitions"] = {"subgraphs": [{"id": "1234-abcd"}]}
    with pytest.raises(ConversionError) as info:
        ui_to_api(ui, FAKE_OBJECT_INFO)
    assert "node 9 has type 'SomePackNode'" in str(info.value)
    assert "node 10 is a subgraph" in str(info.value) and "File > Export (API)" in str(info.value)


def test_ui_conversion_refuses_mismatched_widgets():
    ui = ui_workflow()
    ui["nodes"][0]["widgets_values"] = [64, 32, 1]
    with pytest.raises(ConversionError, match=r"node 1 \(EmptyImage\): the workflow stores 3 widget values"):
        ui_to_api(ui, FAKE_OBJECT_INFO)


def test_ui_workflow_saved_before_an_optional_widget_was_appended_still_converts():
    ui = ui_workflow()
    ui["nodes"][2]["widgets_values"] = [42, "randomize", 9, "hello", "b"]  # no "strength" yet
    api = ui_to_api(ui, FAKE_OBJECT_INFO)
    assert "strength" not in api["3"]["inputs"] and api["3"]["inputs"]["mode"] == "b"  # the server's default
    ui["nodes"][2]["widgets_values"] = [42, "randomize", 9, "hello"]  # a REQUIRED widget missing: refused
    with pytest.raises(ConversionError, match="the workflow stores 4 widget values"):
        ui_to_api(ui, FAKE_OBJECT_INFO)


# ----------------------------------------------------------------------------- `run` command
def test_cli_run_downloads_outputs(fake, tmp_path, capsys):
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(sampler_workflow()))
    rc = main(["run", str(wf), "--server", fake.url, "--out", str(tmp_path / "o"), "--set", "3.steps=2"])
    assert rc == 0
    assert (tmp_path / "o" / "t_00001_.png").read_bytes().startswith(PNG_MAGIC)
    assert fake.posted[0][1]["3"]["inputs"]["steps"] == 2


def test_cli_run_ui_workflow_uses_object_info(fake, tmp_path):
    wf = tmp_path / "ui.json"
    wf.write_text(json.dumps(ui_workflow()))
    assert main(["run", str(wf), "--server", fake.url, "--out", str(tmp_path)]) == 0
    assert fake.posted[0][1]["3"]["inputs"]["seed"] == 42


def test_cli_run_prints_validation_errors(fake, tmp_path, capsys):
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(trivial_workflow()))
    rc = main(["run", str(wf), "--server", fake.url, "--set", "1.height=5000"])
    err = capsys.readouterr().err
    assert rc == 2 and "* EmptyImage 1:" in err and "Value bigger than max: height, 5000 > 4096" in err


def test_cli_run_prints_execution_error(fake, tmp_path, capsys):
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(sampler_workflow()))
    rc = main(["run", str(wf), "--server", fake.url, "--set", "3.text=FAIL_ALWAYS"])
    err = capsys.readouterr().err
    assert rc == 1 and "RuntimeError: forced failure" in err and "Traceback" in err


def test_cli_unknown_set_target_lists_nodes(fake, tmp_path, capsys):
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(trivial_workflow()))
    assert main(["run", str(wf), "--server", fake.url, "--set", "5.seed=1"]) == 2
    assert "1 EmptyImage: width, height" in capsys.readouterr().err
    assert not fake.posted


def test_cli_server_down(tmp_path, capsys):
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(trivial_workflow()))
    assert main(["run", str(wf), "--server", f"127.0.0.1:{free_port()}"]) == 3
    assert "not reachable" in capsys.readouterr().err


def test_launcher_from_non_importable_folder(tmp_path, fake):
    link = tmp_path / "comfyui-gentor"
    link.symlink_to(ROOT, target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, str(link / "headless.py"), "--help"], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path, env=env)
    assert out.returncode == 0 and "batch" in out.stdout
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(trivial_workflow()))
    out = subprocess.run([sys.executable, "comfyui-gentor/headless.py", "run", "wf.json", "--server", fake.url,
                          "--out", "o"], capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "o" / "t_00001_.png").exists()


def test_cancel_reports_what_really_happened(fake):
    client = ComfyClient(fake.url)
    fake.delay = 0.5
    running = client.queue_prompt(trivial_workflow(color=1))
    pending = client.queue_prompt(trivial_workflow(color=2))
    assert wait_for(lambda: fake._running == running, 5)
    assert client.cancel(pending) is None and client.cancel(running) is None
    assert pending not in fake.history and fake.history[running]["status"]["status_str"] == "error"
    fake.delay = 0
    done = client.queue_prompt(trivial_workflow(color=3))
    assert wait_for(lambda: done in fake.history, 5)
    assert client.cancel(done)["status"]["status_str"] == "success"  # finished before the interrupt: kept


def test_works_without_websocket_client_installed(fake, monkeypatch):
    import gentor_headless.client as client_module

    monkeypatch.setattr(client_module, "websocket", None)
    client = ComfyClient(fake.url)
    assert client.use_websocket is False
    assert client.wait(client.queue_prompt(trivial_workflow()), timeout=10)["status"]["status_str"] == "success"
    assert not any(p == "/ws" for _, p in fake.requests)
