"""hutch's one Connect codec, read and written against the tests' own (`tests/connect_wire.py`)."""

from __future__ import annotations

from hutch.agent import envelope
from tests.connect_wire import envelope as reference_envelope
from tests.connect_wire import parse_envelopes


def test_an_encoded_message_reads_back_with_its_flags():
    data = envelope.encode({"a": 1}) + envelope.encode({}, envelope.FLAG_END_STREAM)
    assert parse_envelopes(data) == [(0, {"a": 1}), (2, {})]


def test_split_keeps_a_partial_envelope_for_later():
    whole = reference_envelope({"event": {"n": 1}})
    envelopes, rest = envelope.split(whole + whole[:7])
    assert envelopes == [(0, b'{"event": {"n": 1}}')] and rest == whole[:7]


def test_the_decoder_yields_each_message_once_its_last_byte_arrives():
    data = reference_envelope({"n": 1}) + reference_envelope({"n": 2}, flags=2)
    decoder = envelope.Decoder()
    seen = [message for i in range(len(data)) for message in decoder.feed(data[i : i + 1])]
    assert seen == [(0, {"n": 1}), (2, {"n": 2})]
