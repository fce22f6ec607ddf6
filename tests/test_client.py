"""Client helpers: serializer choice and message shape (the live round trips are in test_tasks)."""

from __future__ import annotations

from heimdall_inference.client import serializer_for


def test_serializer_follows_the_payload():
    assert serializer_for({"receivers": [{"iq": {"data": "AAAA"}}]}) == "json"
    assert serializer_for({"receivers": [{"iq": {"data": b"\x00\x01"}}]}) == "msgpack"
    assert serializer_for([{"a": [1, 2, bytearray(b"x")]}]) == "msgpack"
