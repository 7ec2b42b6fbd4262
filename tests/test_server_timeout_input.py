"""server_timeout_s is reachable: a Load Model / all-in-one input (optional, last) and --server-timeout on the CLI."""

from __future__ import annotations

import pytest
from hostile_server import HostileServer

from qwenvl_fast import cli, nodes
from qwenvl_fast import qwenvl_loader as ql
from qwenvl_fast.backends import openai_server as sb


def test_the_input_is_optional_and_last_so_saved_workflows_keep_their_widgets():
    for node in (nodes.QwenVLFastLoadModel, nodes.QwenVLFastRun):
        optional = list(node.INPUT_TYPES()["optional"])
        assert optional[-1] == "server_timeout_s", (node.__name__, optional)
        assert "server_timeout_s" not in node.INPUT_TYPES()["required"]
    kind, options = nodes.QwenVLFastLoadModel.INPUT_TYPES()["optional"]["server_timeout_s"]
    assert kind == "FLOAT" and options["default"] == ql.LoadOptions.server_timeout_s and options["min"] > 0


def test_the_load_model_input_reaches_the_server_and_its_error_says_where_to_raise_it():
    with HostileServer("silent_after_headers") as srv:
        (handle,) = nodes.QwenVLFastLoadModel().load(
            model="(served)", quantization="none", attention_mode="auto", dtype="auto", device="auto",
            compile_vision="off", keep_model_loaded=True, backend="server", server_url=srv.url,
            server_timeout_s=1.0)
        assert handle.options.server_timeout_s == 1.0
        request = ql.GenerationRequest(prompt="Hi", max_new_tokens=4, monitor=False)
        with pytest.raises(sb.ServerError) as err:
            ql.run_once(handle.options, request)
    message = str(err.value)
    assert "within the 1s deadline" in message and "server_timeout_s input" in message
    assert "--server-timeout" in message


def test_the_cli_flag_sets_the_timeout():
    args = cli.build_caption_parser().parse_args(["folder", "--backend", "server", "--server-timeout", "42.5"])
    assert args.server_timeout == 42.5
    default = cli.build_caption_parser().parse_args(["folder"])
    assert default.server_timeout == ql.LoadOptions.server_timeout_s
