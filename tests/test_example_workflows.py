"""The example workflows (UI format) match the nodes' real inputs, so they load without red nodes."""

import json
import sys

import pytest

from conftest import ROOT

WIDGET_TYPES = ("STRING", "INT", "FLOAT", "BOOLEAN")
CORE_NODES = {"LoadImage": 2, "PreviewImage": 0}  # widget count of core nodes used in the examples
WORKFLOWS = sorted((ROOT / "example_workflows").glob("*.json"))


@pytest.fixture(scope="module")
def mappings():
    return sys.modules["qwenvl_fast"].NODE_CLASS_MAPPINGS  # the pack as conftest imported it (pack_path)


def expected_widgets(cls):
    spec = cls.INPUT_TYPES()
    out = []
    for section in ("required", "optional"):
        for name, (typ, _opts) in spec.get(section, {}).items():
            if isinstance(typ, list) or typ in WIDGET_TYPES:
                out.append((name, typ))
                if name == "seed":
                    out.append(("control_after_generate", None))
    return out


def test_three_examples_exist():
    names = {p.stem for p in WORKFLOWS}
    assert {"Caption an image", "Ask two questions with one loaded model", "Caption a folder"} <= names


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_matches_nodes(path, mappings):
    wf = json.loads(path.read_text())
    nodes = {n["id"]: n for n in wf["nodes"]}
    for node in wf["nodes"]:
        kind = node["type"]
        if kind in CORE_NODES:
            assert len(node["widgets_values"]) == CORE_NODES[kind]
            continue
        assert kind in mappings, f"unknown node {kind}"
        widgets = expected_widgets(mappings[kind])
        assert len(node["widgets_values"]) == len(widgets), f"{path.name}: {kind} widget count"
        for (name, typ), value in zip(widgets, node["widgets_values"]):
            if isinstance(typ, list) and name != "model":
                assert value in typ, f"{kind}.{name}={value!r} not in {typ}"
        names = [o["name"] for o in node["outputs"]]
        assert names == list(mappings[kind].RETURN_NAMES)
    for link_id, src, src_slot, dst, _dst_slot, typ in wf["links"]:
        assert nodes[src]["outputs"][src_slot]["type"] == typ
        assert link_id in (nodes[src]["outputs"][src_slot]["links"] or [])
        target = [i for i in nodes[dst]["inputs"] if i["link"] == link_id]
        assert len(target) == 1 and target[0]["type"] in (typ, "*")  # "*": an input of any type (Cache Info)
