"""The bridge over TLS (`[mqtt] tls_ca`) to a real mosquitto TLS listener with a throwaway CA (tests/pki.py)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import aiomqtt
import msgspec
import pytest

from cloud_bridge.app import running_bridge
from cloud_bridge.config import BridgeConfig, MqttConfig
from cloud_bridge.errors import ConfigError
from cloud_bridge.registry import ResultRow
from devservers.ports import free_port
from schemas import Results, encode, new_msg_id
from schemas.topics import Channel, Topics
from tests.factories import examples
from tests.pki import TlsFiles
from tests.plugin_servers import MosquittoFactory

pytestmark = pytest.mark.timeout(60)


async def test_ingest_over_tls(tmp_path: Path, mosquitto_factory: MosquittoFactory, tls: TlsFiles) -> None:
    """Hostname checking stays on in the bridge: the broker's certificate names 127.0.0.1."""
    broker = mosquitto_factory(start=False)
    tls_port = free_port(avoid={broker.port})
    broker.add_listener(tls_port, lines=tls.listener_lines())
    broker.start()
    template = next(m for m in examples("f1", "tls-1") if isinstance(m, Results))
    results = [msgspec.structs.replace(template, msg_id=new_msg_id()) for _ in range(2000)]
    config = BridgeConfig(
        state_dir=str(tmp_path / "state"),
        mqtt=MqttConfig(host="127.0.0.1", port=tls_port, client_id="bridge-tls", tls_ca=str(tls.ca.cert)),
    )
    async with running_bridge(config) as bridge:
        # Published in plain text on the other listener; many small messages share TLS records,
        # which is what the bridge's SSL `pending()` draining is for.
        async with aiomqtt.Client(broker.host, broker.port) as client:
            client.pending_calls_threshold = 5000
            topic = Topics().device("f1", "tls-1", Channel.RESULTS)
            await asyncio.gather(*(client.publish(topic, encode(r), qos=1) for r in results))
        assert bridge.ingestor is not None
        async with asyncio.timeout(15):
            await bridge.ingestor.wait_for(lambda s: s.stored >= len(results))
        # One row per answer (result/2 carries several per message).
        assert await bridge.registry.count(ResultRow) == len(results) * len(template.answers)


async def test_a_garbage_ca_file_stops_the_bridge_with_a_config_error(tmp_path: Path) -> None:
    """At start, naming the setting and the file: not an ssl traceback at every reconnect."""
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN NOTHING-----\n")
    config = BridgeConfig(
        state_dir=str(tmp_path / "state"),
        mqtt=MqttConfig(host="127.0.0.1", port=free_port(), client_id="bridge-bad-ca", tls_ca=str(ca)),
    )
    expected = rf"\[mqtt\] tls_ca {re.escape(str(ca))} holds no PEM CA certificate .*; fix: "
    with pytest.raises(ConfigError, match=expected):
        async with running_bridge(config):
            pass
