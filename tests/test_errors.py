"""How a library's exception is worded inside panoptem's messages (panoptem.errors)."""

from __future__ import annotations

import socket

from panoptem.errors import describe, system_reason


def test_describe_passes_the_first_line_through():
    assert describe(ValueError("the hash is wrong\nmore detail")) == "the hash is wrong"
    assert describe(KeyError()) == "KeyError"
    assert len(describe(RuntimeError("x" * 1000), limit=50)) == 50


def test_describe_takes_the_cause_of_a_torchscript_trace():
    trace = ("The following operation failed in the TorchScript interpreter.\n"
             "Traceback of TorchScript (most recent call last):\n  ...\n"
             "RuntimeError: quantized::conv2d is not supported here")
    assert describe(RuntimeError(trace)) == "RuntimeError: quantized::conv2d is not supported here"


def test_system_reason_follows_the_causes_to_the_operating_system():
    class Wrapper(Exception):
        def __init__(self, reason):
            super().__init__("Max retries exceeded (Caused by NewConnectionError(...))")
            self.reason = reason

    refused = ConnectionRefusedError(111, "Connection refused")
    try:
        try:
            raise refused
        except OSError as inner:
            raise Wrapper(Exception("pool", inner)) from None
    except Wrapper as exc:
        outer = exc
    assert system_reason(outer) == "Connection refused"
    assert system_reason(socket.gaierror(-2, "Name or service not known")) == \
        "Name or service not known"
    assert system_reason(ValueError("no system cause")) == "no system cause"
