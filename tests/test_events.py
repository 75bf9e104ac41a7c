"""Event schema v1: payload round trips, the shipped JSON Schemas, and parse_event's refusals."""

from __future__ import annotations

import json

import jsonschema
import pytest

from speakerd.events import (
    ENVELOPE_FIELDS,
    PAYLOAD_TYPES,
    SCHEMA_NAMES,
    EventError,
    SpeakerChange,
    SpeakerRef,
    SpeakerSegment,
    SpeechEnd,
    SpeechStart,
    Heartbeat,
    SpeakerMerged,
    SpeakerRenamed,
    Status,
    decode_payload,
    encode_event,
    load_schema,
    make_event,
    parse_event,
    validate_event,
)

ALICE = SpeakerRef("spk-alice", "Alice", True)
BOB = SpeakerRef("spk-bob", "Bob", True)

EXAMPLES = {
    "speech.start": SpeechStart(start=10.2),
    "speech.end": SpeechEnd(start=10.2, end=15.0),
    "speaker.change": SpeakerChange(speaker=ALICE, previous=BOB, score=0.8213, margin=0.2104, at=10.35),
    "speaker.change/tentative-from-unknown": SpeakerChange(
        speaker=SpeakerRef.unknown(), previous=None, score=0.31, margin=0.02, at=3.5, tentative=True
    ),
    "speaker.segment": SpeakerSegment(start=10.2, end=15.0, speaker=ALICE, score=0.79, windows=9),
    "status": Status(
        uptime_s=60.0,
        backend="onnx",
        model="ecapa-tdnn-c512",
        counters={"windows": 120, "embedded": 118, "dropped_windows": 2, "overflows": 0, "published": 40},
        queue_depth={"audio": 0, "embed": 1},
    ),
    "speaker.renamed": SpeakerRenamed(old=SpeakerRef("unknown-2", None, False), new=ALICE),
    "speaker.merged": SpeakerMerged(old=SpeakerRef("unknown-3", None, False), new=SpeakerRef("unknown-1", None, False), cause="clustering"),
    "heartbeat": Heartbeat(interval_s=1.0, uptime_s=12.5, subscriptions=2),
}


def wire(payload, seq: int = 7) -> dict:
    return make_event(payload, seq=seq, session="3f2a9c1b7d4e", stream_time=15.1, wall_time=1_718_000_015.1)


@pytest.fixture(scope="module")
def validators() -> dict[str, jsonschema.Draft202012Validator]:
    return {name: jsonschema.Draft202012Validator(load_schema(name)) for name in SCHEMA_NAMES}


def test_every_payload_type_has_an_example_and_a_schema():
    assert {k.split("/")[0] for k in EXAMPLES} == set(PAYLOAD_TYPES)
    assert set(SCHEMA_NAMES) == {"envelope", *PAYLOAD_TYPES}


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_shipped_schemas_are_valid_draft_2020_12(name):
    schema = load_schema(name)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)


@pytest.mark.parametrize("name", list(PAYLOAD_TYPES))
def test_type_schemas_carry_the_envelope_unchanged(name):
    """Each type schema is self-contained (no cross-file $ref); it must not drift from envelope.json."""
    envelope, schema = load_schema("envelope"), load_schema(name)
    for field in ENVELOPE_FIELDS:
        if field != "type":
            assert schema["properties"][field] == envelope["properties"][field], field
        assert field in schema["required"]
    assert schema["properties"]["type"] == {"const": name}


@pytest.mark.parametrize("key", list(EXAMPLES))
def test_payload_round_trips_and_validates(key, validators):
    payload = EXAMPLES[key]
    assert type(payload).from_dict(payload.to_dict()) == payload
    event = wire(payload)
    # Flat: envelope first, payload beside it; the JSON goes through bytes and back unchanged.
    assert list(event)[: len(ENVELOPE_FIELDS)] == list(ENVELOPE_FIELDS)
    back = parse_event(payload.TOPIC.encode(), encode_event(event))
    assert back == event
    assert decode_payload(back) == payload
    validators[payload.TOPIC].validate(back)
    validators["envelope"].validate(back)
    validate_event(back)


def test_encoding_is_compact_one_line_utf8_with_rounded_times():
    payload = SpeakerSegment(start=1.23456, end=2.0004, speaker=SpeakerRef("z", "Zoë", True), score=0.123456, windows=2)
    data = encode_event(make_event(payload, seq=1, session="s", stream_time=2.34567, wall_time=1.23456789))
    text = data.decode("utf-8")
    assert "\n" not in text and ", " not in text and ": " not in text and "Zoë" in text
    event = json.loads(text)
    assert (event["stream_time"], event["wall_time"]) == (2.346, 1.234568)
    assert (event["start"], event["end"], event["score"]) == (1.235, 2.0, 0.1235)


def test_numpy_scalars_become_plain_json_numbers():
    np = pytest.importorskip("numpy")
    payload = SpeakerChange(speaker=ALICE, previous=None, score=np.float32(0.5), margin=np.float64(0.25), at=1.0)
    assert json.loads(encode_event(wire(payload)))["score"] == 0.5


@pytest.mark.parametrize(
    "mutate, where",
    [
        (lambda e: e.pop("score"), "score"),
        (lambda e: e.update(score="high"), "score"),
        (lambda e: e.update(tentative=1), "tentative"),
        (lambda e: e["speaker"].update(known="yes"), "speaker"),
        (lambda e: e.update(speaker={"id": None, "name": "Alice", "known": True}), "speaker"),
        (lambda e: e.update(seq=0), "seq"),
        (lambda e: e.update(v=2), "v"),
        (lambda e: e.update(v=True), "v"),
        (lambda e: e.update(stream_time=-1.0), "stream_time"),
        (lambda e: e.update(extra_field=1), "extra_field"),
        (lambda e: e.pop("session"), "session"),
    ],
)
def test_malformed_events_fail_schema_validation(mutate, where, validators):
    event = json.loads(encode_event(wire(EXAMPLES["speaker.change"])))
    mutate(event)
    with pytest.raises(jsonschema.ValidationError):
        validators["speaker.change"].validate(event)
    with pytest.raises(EventError):
        validate_event(event)


def test_decode_payload_checks_what_the_schema_cannot(validators):
    """JSON Schema cannot say end >= start; from_dict does, so subscribers using it are covered."""
    event = json.loads(encode_event(wire(EXAMPLES["speech.end"])))
    event.update(start=5.0, end=4.0)
    validators["speech.end"].validate(event)
    with pytest.raises(EventError, match="before start"):
        decode_payload(event)


def test_from_dict_rejects_bad_payloads_with_event_error():
    with pytest.raises(EventError, match="missing field 'end'"):
        SpeechEnd.from_dict({"start": 1.0})
    with pytest.raises(EventError, match="before start"):
        SpeechEnd.from_dict({"start": 2.0, "end": 1.0})
    with pytest.raises(EventError, match="known speaker needs an id"):
        SpeakerRef.from_dict({"id": None, "name": "A", "known": True})
    with pytest.raises(EventError, match="must map names to integers"):
        Status.from_dict({"uptime_s": 1, "backend": "b", "model": "m", "counters": {"x": 1.5}, "queue_depth": {}})
    with pytest.raises(EventError, match="unknown event type"):
        decode_payload({"type": "speaker.rename"})


def test_payloads_refuse_nan_at_construction():
    with pytest.raises(ValueError, match="score must be finite"):
        SpeakerChange(speaker=ALICE, previous=None, score=float("nan"), margin=0.1, at=1.0)
    with pytest.raises(ValueError, match="finite"):
        make_event(SpeechStart(1.0), seq=1, session="s", stream_time=float("inf"), wall_time=1.0)
    with pytest.raises(TypeError, match="not an event payload"):
        make_event({"start": 1.0}, seq=1, session="s", stream_time=1.0, wall_time=1.0)  # type: ignore[arg-type]


def test_status_owns_its_counters():
    counters = {"windows": 1}
    status = Status(uptime_s=1.0, backend="b", model="m", counters=counters)
    counters["windows"] = 99
    assert status.to_dict()["counters"] == {"windows": 1}


GOOD = encode_event(wire(EXAMPLES["speech.start"]))


@pytest.mark.parametrize(
    "topic, data, message",
    [
        (b"speech.start", b"\xff\xfe", "not UTF-8"),
        (b"speech.start", b"{not json", "not JSON"),
        (b"speech.start", b"[1, 2]", "must be a JSON object"),
        (b"speech.start", b"{}", "missing field 'v'"),
        (b"speech.start", GOOD.replace(b'"v":1', b'"v":2'), "unsupported event schema version 2"),
        (b"speech.end", GOOD, "does not match event type"),
        (b"speech.start", GOOD.replace(b'"seq":7', b'"seq":0'), "seq must be >= 1"),
        (b"speech.start", GOOD.replace(b'"seq":7', b'"seq":"7"'), "'seq' must be an integer"),
        (b"speech.start", GOOD.replace(b'"session":"3f2a9c1b7d4e"', b'"session":""'), "session must not be empty"),
        (b"speech.start", GOOD.replace(b'"stream_time":15.1', b'"stream_time":-1'), "stream_time must be >= 0"),
        (b"speech.start", GOOD.replace(b'"wall_time":1718000015.1', b'"wall_time":NaN'), "'wall_time' must be a finite"),
    ],
)
def test_parse_event_rejects_garbage(topic, data, message):
    with pytest.raises(EventError, match=message):
        parse_event(topic, data)


def test_parse_event_accepts_str_and_unknown_types():
    """A newer daemon may add types: the envelope is enough for parse_event; decode_payload is stricter."""
    event = {"v": 1, "type": "speaker.rename", "seq": 3, "session": "s", "stream_time": 0.5, "wall_time": 1.0, "x": 1}
    assert parse_event("speaker.rename", json.dumps(event)) == event
    with pytest.raises(EventError):
        decode_payload(event)


def test_load_schema_unknown_name():
    with pytest.raises(EventError, match="no schema for 'speaker.rename'"):
        load_schema("speaker.rename")
