"""The topic layout: builders, parsers and id validation."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas import AlertsTopic, Channel, DeviceTopic, TopicError, Topics, validate_id


def test_every_channel_round_trips() -> None:
    topics = Topics()
    for channel in Channel:
        topic = topics.device("f1", "pi-0042", channel)
        assert topic == f"fleet/f1/pi-0042/{channel.value}"
        assert topics.parse(topic) == DeviceTopic("f1", "pi-0042", channel)


def test_alerts_and_custom_prefix() -> None:
    topics = Topics(prefix="acme/prod")
    assert topics.alerts("f1") == "acme/prod/f1/alerts"
    assert topics.parse("acme/prod/f1/alerts") == AlertsTopic("f1")
    assert topics.filter(Channel.TELEMETRY) == "acme/prod/+/+/telemetry"
    assert Topics.shared("bridges", topics.filter(Channel.TELEMETRY)) == "$share/bridges/acme/prod/+/+/telemetry"


@pytest.mark.parametrize("bad", ["a/b", "a+", "#", "x\x00y", "", "-lead", "sp ace", "x" * 65])
def test_bad_ids_are_rejected_with_the_reason(bad: str) -> None:
    with pytest.raises(TopicError) as err:
        Topics().device("f1", bad, Channel.STATUS)
    assert "device_id" in str(err.value)
    with pytest.raises(TopicError):
        Topics().device(bad, "d1", Channel.STATUS)


def test_reserved_characters_are_named() -> None:
    with pytest.raises(TopicError, match="'/'"):
        validate_id("device_id", "a/b")
    with pytest.raises(TopicError, match="NUL"):
        validate_id("device_id", "a\x00b")


@pytest.mark.parametrize(
    "topic",
    [
        "other/f1/d1/status",
        "fleet/f1",
        "fleet/f1/d1/nope",
        "fleet/f1/d1",
        "fleet/f+/d1/status",
        "fleet/f1/d1/cmd/ack/x",
    ],
)
def test_parse_rejects_foreign_topics(topic: str) -> None:
    with pytest.raises(TopicError):
        Topics().parse(topic)


@pytest.mark.parametrize("prefix", ["", "$SYS", "a//b", "a/+", "a/#"])
def test_bad_prefix(prefix: str) -> None:
    with pytest.raises(TopicError):
        Topics(prefix=prefix)


@given(st.text(max_size=80))
def test_parse_never_raises_anything_but_topic_error(topic: str) -> None:
    try:
        parsed = Topics().parse(topic)
    except TopicError:
        return
    # Whatever parses must build back to the same topic.
    if isinstance(parsed, DeviceTopic):
        assert Topics().device(parsed.fleet_id, parsed.device_id, parsed.channel) == topic
    else:
        assert Topics().alerts(parsed.fleet_id) == topic


def test_model_chunk_topics_round_trip_and_reserve_models() -> None:
    from schemas import ModelTopic

    topics = Topics()
    sha = "ab" * 32
    assert topics.parse(topics.model_chunks("f1", sha)) == ModelTopic("f1", sha)
    assert topics.model_chunks_filter() == "fleet/+/models/+"
    assert topics.parse("fleet/f1/dev-1/model/request").channel == Channel.MODEL_REQUEST  # type: ignore[union-attr]
    with pytest.raises(TopicError, match="reserved"):
        topics.device("f1", "models", Channel.STATUS)
    with pytest.raises(TopicError, match="sha256"):
        topics.model_chunks("f1", "XYZ")
