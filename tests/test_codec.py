"""The message codec: round trips, rejections with field paths, JSON Schema files in step."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import uuid
from typing import Any

import jsonschema
import msgspec
import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas import (
    ALL_MESSAGES,
    Channel,
    Command,
    DecodeError,
    Envelope,
    Input,
    Result,
    Results,
    Status,
    Telemetry,
    TensorError,
    Topics,
    canonical_bytes,
    decode,
    decode_any,
    decode_for_topic,
    decode_tensor,
    encode,
    encode_tensor,
    msg_id_time,
    new_msg_id,
    schema_name,
)
from schemas.codec import CHANNEL_TYPES, OLDER_TYPES, max_bytes_for
from schemas.export import JSON_DIR, file_name, normalised
from schemas.messages import MAX_ANSWERS
from schemas.msgid import MSG_ID_PATTERN
from tests.factories import examples


def _json_schema(message_type: type[Envelope]) -> dict[str, Any]:
    return json.loads((JSON_DIR / file_name(message_type)).read_text())


def test_examples_cover_every_message_type() -> None:
    assert {type(m) for m in examples()} == set(ALL_MESSAGES)


@pytest.mark.parametrize("message", examples(), ids=lambda m: schema_name(type(m)))
def test_round_trip(message: Envelope) -> None:
    data = encode(message)
    assert decode(data, type(message)) == message
    assert decode_any(data) == message
    assert orjson.loads(data)["schema"] == schema_name(type(message))


@pytest.mark.parametrize("message", examples(), ids=lambda m: schema_name(type(m)))
def test_encoded_messages_validate_against_the_shipped_json_schema(message: Envelope) -> None:
    jsonschema.validate(orjson.loads(encode(message)), _json_schema(type(message)))


def test_json_schema_files_are_up_to_date() -> None:
    result = subprocess.run([sys.executable, "-m", "schemas.export", "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_schema_files_do_not_depend_on_how_a_generator_formats() -> None:
    # What msgspec 0.18-0.22 emitted for a type that 0.23 emits dedented, null last, keywords in
    # another order: the same contract, so the same file.
    older = {
        "title": "ModelChunk",
        "description": "One chunk of a model.\n    `data` must hash to `chunk_sha256`.",
        "type": "object",
        "properties": {
            "z": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/ModelRef"}], "default": None},
            "a": {"type": "string", "maxLength": 64, "minLength": 1},
        },
    }
    newer = {
        "description": "One chunk of a model.\n`data` must hash to `chunk_sha256`.",
        "title": "ModelChunk",
        "properties": {
            "z": {"default": None, "anyOf": [{"$ref": "#/$defs/ModelRef"}, {"type": "null"}]},
            "a": {"minLength": 1, "type": "string", "maxLength": 64},
        },
        "type": "object",
    }
    assert orjson.dumps(normalised(older)) == orjson.dumps(normalised(newer))
    # Fields keep the order the type declares them in; a real difference stays a difference.
    assert list(normalised(older)["properties"]) == ["z", "a"]
    newer["properties"]["a"]["maxLength"] = 65
    assert normalised(older) != normalised(newer)


def _status_dict() -> dict[str, Any]:
    return orjson.loads(encode(examples()[0]))


@pytest.mark.parametrize(
    ("mutate", "field", "reason"),
    [
        (lambda d: d.update(schema="status/2"), "$.schema", "status/2"),
        (lambda d: d.update(state=3), "$.state", "Expected `str`"),
        (lambda d: d.update(state="sleeping"), "$.state", "sleeping"),
        (lambda d: d.pop("msg_id"), "$", "msg_id"),
        (lambda d: d.update(msg_id="not-a-uuid"), "$.msg_id", "matching regex"),
        (lambda d: d.update(device_id="a/b"), "$.device_id", "matching regex"),
        (lambda d: d.update(ts=-1), "$.ts", ">= 0"),
        (lambda d: d.update(ts="yesterday"), "$.ts", "Expected `float`"),
        (lambda d: d["model"].update(sha256="XYZ"), "$.model.sha256", "matching regex"),
    ],
)
def test_rejections_name_the_field(mutate: Any, field: str, reason: str) -> None:
    payload = _status_dict()
    mutate(payload)
    with pytest.raises(DecodeError) as err:
        decode(orjson.dumps(payload), Status)
    assert err.value.field == field
    assert reason in str(err.value)


def test_malformed_and_oversized_and_wrong_type() -> None:
    with pytest.raises(DecodeError, match="malformed JSON"):
        decode(b'{"schema": "status/1",', Status)
    with pytest.raises(DecodeError, match="expected a JSON object"):
        decode(b"[1, 2]", Status)
    with pytest.raises(DecodeError, match="limit is 65536"):
        decode(b" " * 70_000, Status)
    with pytest.raises(DecodeError, match="malformed JSON"):
        decode(b'{"ts": NaN}', Status)
    with pytest.raises(DecodeError, match="UTF-8"):
        decode(b'{"state": "\xff\xfe"}', Status)
    # A telemetry payload is not a status, even if it is valid telemetry.
    with pytest.raises(DecodeError) as err:
        decode(encode(examples()[1]), Status)
    assert err.value.field == "$.schema"


def test_unknown_fields_are_ignored_for_additive_changes() -> None:
    payload = _status_dict()
    payload["added_in_a_later_minor"] = {"x": 1}
    assert decode(orjson.dumps(payload), Status).device_id == payload["device_id"]


def test_decode_for_topic_checks_origin() -> None:
    topics = Topics()
    message = examples(device_id="dev-1")[1]
    assert decode_for_topic(topics, topics.device("f1", "dev-1", Channel.TELEMETRY), encode(message)) == message
    with pytest.raises(DecodeError, match="does not match topic device") as err:
        decode_for_topic(topics, topics.device("f1", "dev-2", Channel.TELEMETRY), encode(message))
    assert err.value.field == "$.device_id"
    with pytest.raises(DecodeError, match="expected telemetry/1"):
        decode_for_topic(topics, topics.device("f1", "dev-1", Channel.TELEMETRY), encode(examples()[0]))
    with pytest.raises(DecodeError, match="unknown channel"):
        decode_for_topic(topics, "fleet/f1/dev-1/bogus", encode(message))


def test_canonical_bytes_exclude_the_signature_and_are_stable() -> None:
    cmd = next(m for m in examples() if isinstance(m, Command))
    signed = msgspec.structs.replace(cmd, signature="b3RoZXI=")
    assert canonical_bytes(cmd) == canonical_bytes(signed)
    assert b"signature" not in canonical_bytes(cmd)
    tampered = msgspec.structs.replace(cmd, expires_at=cmd.expires_at + 1)
    assert canonical_bytes(tampered) != canonical_bytes(cmd)


def test_msg_ids_are_unique_and_time_ordered() -> None:
    ids = [new_msg_id(now_ns=1_700_000_000_000_000_000 + i * 1000) for i in range(2000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert math.isclose(msg_id_time(ids[0]), 1_700_000_000.0)
    batch = [new_msg_id() for _ in range(500)]  # the real clock
    assert len(set(batch) | set(ids)) == len(ids) + 500
    assert all(uuid.UUID(i).version == 7 and uuid.UUID(i).variant == uuid.RFC_4122 for i in batch)
    assert all(re.match(MSG_ID_PATTERN, i) for i in batch)


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "int64", "uint8", "bool"])
def test_tensor_round_trip(dtype: str) -> None:
    arr = (np.arange(24).reshape(2, 3, 4) % 2).astype(dtype)
    back = decode_tensor(encode_tensor(arr))
    assert back.dtype == arr.dtype and back.shape == arr.shape
    assert np.array_equal(back, arr)


def test_tensor_rejections() -> None:
    good = encode_tensor(np.ones((2, 2), np.float32))
    with pytest.raises(TensorError, match="needs 16 bytes, data has 12"):
        decode_tensor(msgspec.structs.replace(good, data=b"x" * 12))
    # Bytes that are not base64 in a JSON message are refused when the message is decoded, at the field.
    bad = orjson.loads(encode(examples()[3]))  # input/1
    bad["tensor"]["data"] = "!!!"
    with pytest.raises(DecodeError, match="base64") as invalid:
        decode(orjson.dumps(bad), Input)
    assert invalid.value.field == "$.tensor.data"
    with pytest.raises(TensorError, match="NaN or infinite") as err:
        decode_tensor(encode_tensor(np.array([1.0, np.nan, np.inf], np.float32)), field="$.tensor")
    assert err.value.field == "$.tensor.data"
    with pytest.raises(TensorError, match="cannot go on the wire"):
        encode_tensor(np.array(["a"]))


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=6),
    max_leaves=30,
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_garbage_bytes_raise_only_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_any(data)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(_json, st.sampled_from([schema_name(t) for t in ALL_MESSAGES]))
def test_garbage_json_with_a_valid_schema_tag_raises_only_decode_error(value: Any, tag: str) -> None:
    payload = {"schema": tag, "body": value} if not isinstance(value, dict) else {**value, "schema": tag}
    with pytest.raises(DecodeError):
        decode_any(orjson.dumps(payload))


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_valid_messages_either_decode_or_raise_decode_error(data: st.DataObject) -> None:
    message = data.draw(st.sampled_from(examples()))
    payload = orjson.loads(encode(message))
    key = data.draw(st.sampled_from(sorted(payload)))
    payload[key] = data.draw(_json)
    try:
        decoded = decode(orjson.dumps(payload), type(message))
    except DecodeError:
        return
    # Anything accepted must also satisfy the published JSON Schema.
    jsonschema.validate(orjson.loads(encode(decoded)), _json_schema(type(message)))


def test_an_empty_telemetry_window_is_small_and_valid() -> None:
    from tests.factories import MODEL, envelope

    message = Telemetry(**envelope(), model=MODEL, window_start=1.0, window_end=2.0, window_seq=0, count=0)
    data = encode(message)
    assert len(data) < 400
    assert b"latency_ms" not in data  # no stats for an empty window, rather than NaN
    assert decode(data, Telemetry) == message
    jsonschema.validate(orjson.loads(data), _json_schema(Telemetry))


def test_encode_writes_the_same_bytes_as_orjson_over_builtins() -> None:
    import orjson

    from schemas import to_builtins

    for message in examples():
        assert encode(message) == orjson.dumps(to_builtins(message)), type(message).__name__


# ---- results: result/2 on the wire, result/1 still accepted from older devices -------------------


def _results_example() -> Results:
    return next(m for m in examples() if isinstance(m, Results))


def _result_v1_example() -> Result:
    return next(m for m in examples() if isinstance(m, Result))


RESULTS_TOPIC = Topics().device("f1", "dev-1", Channel.RESULTS)


def test_results_channel_carries_result2_and_still_accepts_result1() -> None:
    assert CHANNEL_TYPES[Channel.RESULTS] is Results
    assert OLDER_TYPES[Channel.RESULTS] == (Result,)
    message = _results_example()
    assert len(message.answers) == 2 and {a.path for a in message.answers} == {"edge", "cloud"}
    data = encode(message)
    assert orjson.loads(data)["schema"] == "result/2"
    decoded = decode_for_topic(Topics(), RESULTS_TOPIC, data)
    assert isinstance(decoded, Results) and decoded == message
    assert [a.inference_id for a in decoded.answers] == ["inf-2", "inf-1"]  # order is kept
    older = _result_v1_example()
    decoded_older = decode_for_topic(Topics(), RESULTS_TOPIC, encode(older))
    assert isinstance(decoded_older, Result) and decoded_older == older


def test_results_channel_checks_origin_for_both_versions() -> None:
    other_device = Topics().device("f1", "dev-2", Channel.RESULTS)
    for message in (_results_example(), _result_v1_example()):
        with pytest.raises(DecodeError, match="does not match topic device") as err:
            decode_for_topic(Topics(), other_device, encode(message))
        assert err.value.field == "$.device_id"


def test_result1_is_accepted_only_on_the_results_channel_and_only_by_the_lenient_reader() -> None:
    older = encode(_result_v1_example())
    # A strict reader of the current version refuses the older one...
    with pytest.raises(DecodeError) as err:
        decode(older, Results)
    assert err.value.field == "$.schema" and "result/1" in str(err.value)
    # ...and no other channel takes results of either version.
    for data in (older, encode(_results_example())):
        with pytest.raises(DecodeError, match="expected telemetry/1") as err:
            decode_for_topic(Topics(), Topics().device("f1", "dev-1", Channel.TELEMETRY), data)
        assert err.value.field == "$.schema"


def _answers_payload(n: int) -> dict[str, Any]:
    payload: dict[str, Any] = orjson.loads(encode(_results_example()))
    answer = payload["answers"][0]
    payload["answers"] = [{**answer, "inference_id": f"inf-{i}"} for i in range(n)]
    return payload


@pytest.mark.parametrize("n", [0, MAX_ANSWERS + 1])
def test_results_with_no_answers_or_too_many_are_rejected_at_answers(n: int) -> None:
    with pytest.raises(DecodeError) as err:
        decode_for_topic(Topics(), RESULTS_TOPIC, orjson.dumps(_answers_payload(n)))
    assert err.value.field == "$.answers", err.value
    assert err.value.schema == "result/2"


def test_results_with_max_answers_is_accepted_even_over_the_result1_size_limit() -> None:
    data = orjson.dumps(_answers_payload(MAX_ANSWERS))
    assert max_bytes_for(Result) < len(data) <= max_bytes_for(Results)
    decoded = decode_for_topic(Topics(), RESULTS_TOPIC, data)
    assert isinstance(decoded, Results) and len(decoded.answers) == MAX_ANSWERS


def test_an_answer_out_of_range_is_named_by_its_place() -> None:
    payload = _answers_payload(3)
    payload["answers"][2]["confidence"] = 1.5
    with pytest.raises(DecodeError) as err:
        decode_for_topic(Topics(), RESULTS_TOPIC, orjson.dumps(payload))
    assert err.value.field == "$.answers[2].confidence" and "<= 1.0" in str(err.value)


@pytest.mark.parametrize("tag", ["result/3", "result/0", "result"])
def test_an_unknown_results_version_is_rejected(tag: str) -> None:
    payload = orjson.loads(encode(_results_example()))
    payload["schema"] = tag
    with pytest.raises(DecodeError) as err:
        decode_for_topic(Topics(), RESULTS_TOPIC, orjson.dumps(payload))
    assert err.value.field == "$.schema" and tag in str(err.value)


def test_an_oversized_result1_is_rejected_though_result2_may_be_larger() -> None:
    limit = max_bytes_for(Result)
    assert limit == 64 * 1024 and max_bytes_for(Results) == 1024 * 1024
    pad = b',"pad":"' + b"x" * (limit + 1024) + b'"}'
    older = encode(_result_v1_example())[:-1] + pad
    assert limit < len(older) < max_bytes_for(Results)
    with pytest.raises(DecodeError, match=f"payload is {len(older)} bytes, the limit is {limit}"):
        decode_for_topic(Topics(), RESULTS_TOPIC, older)
    # The same padding on a result/2 is within its limit (unknown fields are ignored).
    message = _results_example()
    assert decode_for_topic(Topics(), RESULTS_TOPIC, encode(message)[:-1] + pad) == message
    # Nothing over the result/2 limit is accepted, whatever its version.
    huge = b',"pad":"' + b"x" * max_bytes_for(Results) + b'"}'
    for big in (encode(message)[:-1] + huge, encode(_result_v1_example())[:-1] + huge):
        with pytest.raises(DecodeError, match=f"the limit is {max_bytes_for(Results)}"):
            decode_for_topic(Topics(), RESULTS_TOPIC, big)
