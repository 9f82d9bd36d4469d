"""A deadline that is not a finite number of seconds is refused where it is given: ``timeout=float("inf")`` (a
natural way to say "no deadline") and NaN were accepted, and every call then failed at once with DEADLINE_EXCEEDED
(the library, ``chatforge chat/loadtest/health --timeout inf``)."""

from __future__ import annotations

import math
import re

import pytest
from typer.testing import CliRunner

from chatforge.cli import app
from chatforge.client import ChatbotClient
from chatforge.client.loadtest import LoadTestConfig, LoadTestError

NOT_FINITE = [math.inf, math.nan]


@pytest.mark.parametrize("timeout", NOT_FINITE, ids=["inf", "nan"])
def test_the_client_refuses_a_timeout_that_is_not_finite(timeout):
    with pytest.raises(ValueError, match=r"timeout=(inf|nan) is out of range; allowed: a finite number of seconds "
                                         r"> 0, or None"):
        ChatbotClient("127.0.0.1:1", timeout=timeout)


@pytest.mark.parametrize("timeout", NOT_FINITE, ids=["inf", "nan"])
def test_a_load_test_refuses_a_timeout_that_is_not_finite(timeout):
    with pytest.raises(LoadTestError, match=r"timeout=(inf|nan) is out of range; allowed: a finite number of seconds"):
        LoadTestConfig(target="127.0.0.1:1", requests=1, timeout=timeout, texts=["hi"]).validate()


@pytest.mark.parametrize("command", [["chat", "127.0.0.1:1", "-m", "hi"], ["health", "127.0.0.1:1"],
                                     ["loadtest", "127.0.0.1:1", "-n", "1"]], ids=["chat", "health", "loadtest"])
def test_the_commands_refuse_an_infinite_timeout_in_one_line(command):
    result = CliRunner().invoke(app, [*command, "--timeout", "inf"])
    assert result.exit_code == 2, result.output
    assert re.search(r"timeout[ =]inf is out of range; allowed: a finite number of seconds > 0", result.output)


@pytest.mark.parametrize("timeout", [0, -1, math.inf, math.nan], ids=["zero", "negative", "inf", "nan"])
def test_the_http_client_refuses_a_timeout_out_of_range_naming_it(timeout):
    # It was taken: 0 failed each call as "HTTP 503 (unavailable) ... no answer after 4 attempts" from a healthy
    # server, inf raised OverflowError and -1 httpx's "Timeout value out of range" at the first call.
    from chatforge.client.http import HttpChatClient

    with pytest.raises(ValueError, match=r"timeout=.* is out of range; allowed: a finite number of seconds > 0"):
        HttpChatClient("127.0.0.1:1", timeout=timeout)
