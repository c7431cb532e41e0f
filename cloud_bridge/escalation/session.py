"""The MQTT session escalations travel on ([escalation] session = "own", the default).

Ingestion acknowledges a message only after its batch committed, so the broker's in-flight window
of the bridge's session (Receive Maximum; max_inflight_messages under 3.1.1) fills with device
messages whenever a commit is slow or a backlog drains, and the broker then sends that session
nothing else: an escalation request queued behind them waited for the backlog, its answer came
after the device had given up (2 s). Requests on a session of their own have a window of their own
(replies bounded by `[escalation] replies_in_flight`, the model by `max_concurrency`), and their
socket is read on its own event-loop callback, not after a batch of device messages.

The session is an ordinary `MqttConnection`: a persistent session subscribed to
`$share/{group}/{prefix}/+/+/escalate` only, checked at every connect that the broker delivers
`$share` (SharedProbe, with its own probe topic), MQTT 5 or 3.1.1 as `[mqtt] protocol` says.
Replies go to the device's escalate/reply topic with the request's Correlation Data (MQTT 5).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

from cloud_bridge.config import BridgeConfig, MqttConfig
from cloud_bridge.escalation.escalator import Escalator, escalation_filter
from cloud_bridge.mqtt import MessageHandler, MqttConnection, SharedProbe

log = logging.getLogger(__name__)

SUFFIX = "-escalation"


def session_config(config: BridgeConfig) -> MqttConfig:
    """[mqtt] with the escalation session's identity and reply window."""
    mqtt, esc = config.mqtt, config.escalation
    return replace(
        mqtt,
        client_id=esc.client_id or f"{mqtt.client_id}{SUFFIX}",
        username=esc.username if esc.username is not None else mqtt.username,
        password=esc.password if esc.password is not None else mqtt.password,
        publish_window=esc.replies_in_flight,
    )


def escalation_connection(config: BridgeConfig, on_message: MessageHandler) -> MqttConnection:
    """The escalation session's connection (not yet running: `run()` it)."""
    mqtt = session_config(config)
    fleet, topics = config.fleet, config.topics
    probe = SharedProbe(fleet.share_group, f"{topics.prefix}/_probe/{mqtt.client_id}", fleet.shared_fallback)
    subscriptions = [(escalation_filter(topics, fleet.share_group, fleet.shared), 1)]
    return MqttConnection(mqtt, subscriptions, on_message, probe)


# Both sessions reconnecting this often within the window, on one login: the broker gives them one
# client id. A broker restart or a link drop reconnects each once, not three times in ten seconds.
CLASH_RECONNECTS = 3
CLASH_WINDOW_S = 10.0
_CLASH_POLL_S = 0.5


async def watch_for_clash(main: MqttConnection, own: MqttConnection) -> None:
    """Return once the two sessions keep taking each other over: a broker that makes the username the
    client id (Mosquitto's use_username_as_clientid, as mosquitto/cloud.conf does) gives both logins
    of one account the same session, so each connect closes the other. `cloud-bridge check` says so
    before a start; this is for a bridge started without it. A counter read twice a second, not an
    event: a takeover reaches paho as a DISCONNECT reason on some brokers and as a closed socket on
    others (Mosquitto 2.0.11 over TLS), but either way the generation counts the reconnect."""
    history: list[tuple[float, int, int]] = []
    loop = asyncio.get_running_loop()
    while True:
        now = loop.time()
        history.append((now, main.generation, own.generation))
        while history and history[0][0] < now - CLASH_WINDOW_S:
            history.pop(0)
        _, main_then, own_then = history[0]
        if main.generation - main_then >= CLASH_RECONNECTS and own.generation - own_then >= CLASH_RECONNECTS:
            return
        await asyncio.sleep(_CLASH_POLL_S)


async def move_to_main_session(
    main: MqttConnection, own: MqttConnection, escalator: Escalator, shared_filter: str, username: str | None
) -> None:
    """After a clash: close the escalation session, reply and acknowledge on the main one, and
    subscribe it to the escalation requests (what a not yet acknowledged request came on, the broker
    sends again there: both logins had one session)."""
    log.error(
        "mqtt sessions clash username=%s: the escalation session and the [mqtt] session keep closing each "
        "other (the broker makes the username the client id, e.g. use_username_as_clientid); escalations "
        "moved to the [mqtt] session for this run. Fix: give the escalation session an account of its own "
        "([escalation] username and password, a user block in the broker's ACL) or set "
        '[escalation] session = "shared"',
        username,
    )
    await own.close()
    escalator.use_session(main.publish, main.ack)
    main.add_subscriptions([(shared_filter, 1)])
