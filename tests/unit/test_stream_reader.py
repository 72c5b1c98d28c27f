"""The rebuild's stream reader (services/projections/reader.py): the stream sequence of a message, read from its
JetStream ack subject without nats-py's metadata objects. Pure."""
from __future__ import annotations

import pytest

from services.projections.reader import stream_seq


@pytest.mark.parametrize(("reply", "seq"), [
    ("$JS.ACK.NEEDLE_EVENTS.projections.1.4242.17.1732370000000000000.9", 4242),
    ("$JS.ACK.hub.ACCHASH.NEEDLE_EVENTS.projections.1.4242.17.1732370000000000000.9.tok", 4242),
    ("$JS.ACK.hub.ACCHASH.NEEDLE_EVENTS.projections.1.4242.17.1732370000000000000.9", 4242),
])
def test_the_stream_sequence_is_read_from_either_ack_subject_form(reply: str, seq: int) -> None:
    assert stream_seq(reply) == seq


@pytest.mark.parametrize("reply", ["", "_INBOX.abc", "$JS.ACK.NEEDLE_EVENTS.projections.1"])
def test_a_reply_that_is_no_jetstream_ack_subject_is_refused(reply: str) -> None:
    with pytest.raises(ValueError):
        stream_seq(reply)
