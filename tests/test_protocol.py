"""Parsing frames into JSON-RPC messages, and the errors of PROTOCOL §3."""

import pytest

from realtime.management.commands.serve import daphne_argv
from realtime.rpc.protocol import (
    INVALID_REQUEST,
    PARSE_ERROR,
    ClientResponse,
    JsonRpcError,
    Notification,
    Request,
    encode,
    parse_message,
)


def test_request_with_and_without_jsonrpc_member():
    assert parse_message('{"id": 1, "method": "thread/start", "params": {}}') == Request(1, "thread/start", {})
    assert parse_message('{"jsonrpc": "2.0", "id": "a", "method": "x"}') == Request("a", "x", None)


def test_notification_and_client_response():
    assert parse_message('{"method": "initialized"}') == Notification("initialized")
    assert isinstance(parse_message('{"id": 3, "result": {}}'), ClientResponse)


@pytest.mark.parametrize(
    "frame",
    ["", "not json", "[1, 2]", "42", '"text"', "null", '{"id": 1,', '{"a": NaN}', "[" * 100000, "1" * 5000],
)
def test_frames_that_are_not_json_objects_are_parse_errors_with_null_id(frame):
    with pytest.raises(JsonRpcError) as caught:
        parse_message(frame)
    assert caught.value.code == PARSE_ERROR and caught.value.request_id is None
    assert caught.value.message.startswith("Parse error")


@pytest.mark.parametrize("bad_id", ["1.5", "null", "true", "{}", "[]"])
def test_ids_that_are_neither_string_nor_integer_are_refused(bad_id):
    with pytest.raises(JsonRpcError) as caught:
        parse_message(f'{{"id": {bad_id}, "method": "x"}}')
    assert caught.value.code == INVALID_REQUEST and caught.value.request_id is None


def test_method_of_wrong_type_is_invalid_request_with_the_id():
    with pytest.raises(JsonRpcError) as caught:
        parse_message('{"id": 7, "method": 5}')
    assert caught.value.code == INVALID_REQUEST and caught.value.request_id == 7


def test_encoding_survives_lone_surrogates():
    text = encode({"id": 1, "error": {"message": "\ud800"}})
    text.encode("utf-8")  # would raise if the surrogate were written raw


def test_serve_never_closes_a_websocket_for_its_age():
    argv = daphne_argv("127.0.0.1", 8765, [])
    assert argv[argv.index("--websocket_timeout") + 1] == "-1"  # daphne's default is 24 h
    assert argv[-1] == "codexserver.asgi:application"
    assert daphne_argv("127.0.0.1", 8765, ["--proxy-headers"])[-2] == "--proxy-headers"
