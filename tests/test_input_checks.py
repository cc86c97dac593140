"""The shared node-input check (samplers/common.check_inputs, applied to every node by nodes/common.checked):
every float of every node refuses NaN / ±inf / out-of-range values naming the node and the input; a socket
given a plain string and text no tokenizer takes are refused naming the input. The node schemas are read
statically (tests/workflow_static.py) so this runs without ComfyUI; tests/test_server_inputs.py sends the
same values through a real ComfyUI."""
from __future__ import annotations

import math

import pytest

from gentor.errors import InputError
from gentor.loaders.cache import ModelHandle
from gentor.loaders.memory import MemoryOptions
from gentor.samplers.common import InputField, Settings, check_inputs
from tests import workflow_static as wstatic

SPECS = wstatic.static_specs()
FLOATS = [(spec, item) for spec in SPECS.values() for item in spec.inputs if item.type == "FLOAT"]
SOCKET_TYPES = {"GENTOR_MODEL": ModelHandle, "GENTOR_MEMORY": MemoryOptions, "GENTOR_SETTINGS": Settings}
SOCKETS = [(spec, item) for spec in SPECS.values() for item in spec.inputs if item.type in SOCKET_TYPES]
TEXTS = [(spec, item) for spec in SPECS.values() for item in spec.inputs if item.type == "STRING"]


def ids(pairs):
    return [f"{spec.node_id}.{item.name}" for spec, item in pairs]


def test_the_pack_has_float_socket_and_text_inputs_to_check():
    # The cases are among them: BAGEL's timestep_shift / cfg_img_scale and the LoRA strength.
    names = set(ids(FLOATS))
    assert {"GentorBagelSettings.timestep_shift", "GentorBagelSettings.cfg_img_scale", "GentorLoRA.strength",
            "GentorTextToImage.cfg"} <= names
    assert len(SOCKETS) >= 10 and len(TEXTS) >= 3


@pytest.mark.parametrize("spec, item", FLOATS, ids=ids(FLOATS))
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_every_float_input_refuses_non_finite(spec, item, value):
    field = InputField(item.name, "float", item.min, item.max)
    with pytest.raises(InputError) as info:
        check_inputs(spec.display_name, [field], {item.name: value})
    message = str(info.value)
    assert message.startswith(f"{spec.display_name} {item.name}: "), message
    assert "not a finite number" in message and f"got {value!r}" in message


@pytest.mark.parametrize("spec, item", FLOATS, ids=ids(FLOATS))
def test_every_float_input_checks_its_range(spec, item):
    assert item.min is not None and item.max is not None, f"{spec.node_id}.{item.name} states no range"
    field = InputField(item.name, "float", item.min, item.max)
    check_inputs(spec.display_name, [field], {item.name: float(item.min)})  # both ends are allowed
    check_inputs(spec.display_name, [field], {item.name: float(item.max)})
    for outside in (item.min - 1.0, item.max + 1.0):
        with pytest.raises(InputError, match=rf"^{spec.display_name} {item.name}: out of range"):
            check_inputs(spec.display_name, [field], {item.name: outside})


@pytest.mark.parametrize("spec, item", SOCKETS, ids=ids(SOCKETS))
def test_every_gentor_socket_refuses_a_plain_string(spec, item):
    field = InputField(item.name, "socket", expected=SOCKET_TYPES[item.type], connect="the right node")
    with pytest.raises(InputError) as info:
        check_inputs(spec.display_name, [field], {item.name: "tiny-qwen-image"})
    message = str(info.value)
    assert message.startswith(f"{spec.display_name} {item.name}: ") and "got str 'tiny-qwen-image'" in message
    assert "Connect the right node" in message


def test_a_connected_socket_and_an_unconnected_optional_one_pass():
    fields = [InputField("model", "socket", expected=ModelHandle, connect="x"),
              InputField("memory", "socket", expected=MemoryOptions, connect="y")]
    check_inputs("Node", fields, {"model": ModelHandle("qwen_image", "v", (("model", "/m"),)), "memory": None})


@pytest.mark.parametrize("spec, item", TEXTS, ids=ids(TEXTS))
@pytest.mark.parametrize("bad, what", [("a\x00b", "NUL"), ("cat \ud83d dog", "lone UTF-16 surrogate")])
def test_every_text_input_refuses_text_no_tokenizer_takes(spec, item, bad, what):
    with pytest.raises(InputError) as info:
        check_inputs(spec.display_name, [InputField(item.name, "text")], {item.name: bad})
    assert str(info.value).startswith(f"{spec.display_name} {item.name}: contains a {what}"), str(info.value)
