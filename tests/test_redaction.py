"""Secrets are masked always, caller PII unless switched off, and addresses are not taken for PII."""

from __future__ import annotations

import pytest

from services.runtime import log


@pytest.mark.parametrize(
    ("line", "masked"),
    [
        ("my card is 4111 1111 1111 1111", "my card is [card]"),
        ("mail jane.doe@example.com please", "mail [email] please"),
        ("call +44 20 7946 0958 now", "call [phone] now"),
        (
            "headers {'authorization': 'Token dg0123456789abcdef'}",
            "headers {'authorization': 'Token [secret]'}",
        ),
        ("POST http://127.0.0.1:46633/v1/messages", "POST http://127.0.0.1:46633/v1/messages"),
        ("peer 10.20.30.40 joined", "peer 10.20.30.40 joined"),
    ],
)
def test_a_log_line_is_masked(line: str, masked: str) -> None:
    assert log.redact(line) == masked
