"""`edge-node check`: diagnose a device's configuration, files, broker and keys, one line per check.

In order: the config loads; the model loads as a classifier on the requested execution provider;
the outbox and OTA state directories are writable with disk to spare; the input source can work;
the broker is reachable over TCP, its TLS certificate verifies and is not near expiry (and the
client certificate's neither), the credentials log in; commands can be verified (trusted keys); the
device's clock agrees with the cloud's (one clock/1 round trip to a running bridge, on the login's
connection). Shared probes are common/checks.py's; the report is printed
by edge_node/cli.py.
"""

from __future__ import annotations

import importlib.util
import ssl
import time
from collections.abc import Callable
from pathlib import Path

from paho.mqtt.packettypes import PacketTypes

from common.checks import Checklist, MqttProbe, login_finding, probe_cert_file, probe_dir, probe_tcp, probe_tls
from common.mqtt import Failure, new_properties
from common.tls import client_context
from edge_node.config import EdgeConfig, load_config
from edge_node.errors import ConfigError, ModelLoadError
from schemas import Channel, ClockReply, ClockRequest, DecodeError, decode, encode, new_msg_id

CONFIG, MODEL, PROVIDERS = "config", "model", "execution provider"
OUTBOX_DIR, OTA_DIR, SOURCE = "outbox dir", "ota state dir", "input source"
BROKER, TLS, CLIENT_CERT, LOGIN = "broker reachable", "tls", "client certificate", "mqtt login"
KEYS, CLOCK = "trusted keys", "clock"
ALL = (CONFIG, MODEL, PROVIDERS, OUTBOX_DIR, OTA_DIR, SOURCE, BROKER, TLS, CLIENT_CERT, LOGIN, KEYS, CLOCK)
CLOCK_WAIT_S = 5.0


async def diagnose(path: Path, clock: Callable[[], float] = time.time) -> Checklist:
    """Run every check against the configuration file at `path` (`clock`: this device's time)."""
    checks = Checklist()
    try:
        config = load_config(path)
    except ConfigError as exc:
        checks.fail(CONFIG, str(exc), f"edit {path} (examples/edge.toml documents every key)")
        checks.skip_all(ALL[1:], "the configuration does not load")
        return checks
    dev, m = config.device, config.mqtt
    checks.ok(CONFIG, f"{path}: fleet={dev.fleet_id} device={dev.device_id} broker={m.host}:{m.port}")
    _model(checks, config)
    checks.add(probe_dir(OUTBOX_DIR, config.outbox.path.parent, "[outbox] path", need_bytes=config.outbox.max_bytes))
    checks.add(probe_dir(OTA_DIR, config.ota_state_dir, "[ota] state_dir"))
    _source(checks, config)
    probe = await _broker(checks, config)
    try:
        _keys(checks, config)
        if probe is None:
            checks.skip(CLOCK, "no MQTT connection")
        else:
            await _clock(checks, config, probe, clock)
    finally:
        if probe is not None:
            await probe.close()
    return checks


def _model(checks: Checklist, config: EdgeConfig) -> None:
    from edge_node.inference.model import Classifier

    model = config.model
    try:
        classifier = Classifier.load(model.path, model.providers, model.intra_op_threads)
    except ModelLoadError as exc:
        checks.fail(
            MODEL,
            str(exc),
            "point [model] path at an ONNX classifier (README 'Bring your own model' lists what it needs)",
        )
        checks.skip(PROVIDERS, "the model does not load")
        return
    info = classifier.info
    checks.ok(
        MODEL,
        f"{info.ref.name} {info.ref.version} ({model.path}): input {list(info.feature_shape)} {info.input_dtype}, "
        f"{len(info.labels)} classes, output {info.output_kind}",
    )
    report = classifier.providers
    if report.fallback:
        checks.warn(
            PROVIDERS,
            f"requested {list(report.requested)} but the model runs on {list(report.active)} (slower than planned)",
            "install the onnxruntime build and libraries of the requested provider, or request "
            'providers = ["CPUExecutionProvider"]',
        )
    else:
        checks.ok(PROVIDERS, f"{', '.join(report.active)} active")


def _source(checks: Checklist, config: EdgeConfig) -> None:
    src = config.source
    if src.kind == "mqtt":
        topic = config.topics.device(config.device.fleet_id, config.device.device_id, Channel.INPUT)
        checks.ok(SOURCE, f"mqtt: input/1 messages on {topic}")
    elif src.kind == "directory":
        assert src.path is not None
        if not src.path.is_dir():
            checks.fail(SOURCE, f"directory {src.path} does not exist", "create it, or set [source] path")
        else:  # read files are moved to done/ and failed/ in it
            checks.add(probe_dir(SOURCE, src.path, "[source] path"))
    elif importlib.util.find_spec("demokit") is None:
        checks.fail(
            SOURCE,
            "replay needs the demo kit (demokit), which is not installed",
            'install the demo extra (pip install \'edgefleet[demo]\'), or use [source] kind = "mqtt" or "directory"',
        )
    else:
        checks.ok(SOURCE, f"replay of the demo digits at {src.rate_hz}/s")


def _tls_context(config: EdgeConfig) -> ssl.SSLContext | Failure | None:
    m = config.mqtt
    if m.tls_ca is None and m.tls_cert is None:  # as the link decides (LinkConfig.tls)
        return None
    try:
        return client_context(m.tls_ca, m.tls_cert, m.tls_key, error=ConfigError)
    except ConfigError as exc:
        return Failure("tls", str(exc))


async def _broker(checks: Checklist, config: EdgeConfig) -> MqttProbe | None:
    """Reachable, TLS, login: the probe connection for the checks after it (None when it failed)."""
    m = config.mqtt
    where = f"{m.host}:{m.port}"
    checks.add(await probe_tcp(BROKER, m.host, m.port, "[mqtt]"))
    context = _tls_context(config)
    if isinstance(context, Failure):
        checks.fail(TLS, context.detail, "fix the file named, or the setting")
    elif context is None:
        checks.ok(TLS, f"not configured: plain MQTT to {where} (set [mqtt] tls_ca to encrypt)")
    elif not checks.passed(BROKER):
        checks.skip(TLS, f"{where} is not reachable")
    else:
        checks.add(await probe_tls(TLS, m.host, m.port, context, "[mqtt]"))
    if m.tls_cert is not None:
        checks.add(probe_cert_file(CLIENT_CERT, m.tls_cert, "[mqtt] tls_cert"))
    else:
        checks.ok(CLIENT_CERT, "none configured (the broker authenticates by user name and password)")
    if not checks.passed(BROKER) or not checks.passed(TLS):
        checks.skip(LOGIN, f"{where} is not reachable" if not checks.passed(BROKER) else "the TLS check failed")
        return None
    tls = context if isinstance(context, ssl.SSLContext) else None
    result = await _login(config, tls, v5=m.protocol != "mqtt311")
    if isinstance(result, Failure) and result.kind == "protocol" and m.protocol == "auto":
        result = await _login(config, tls, v5=False)  # the link falls back to 3.1.1 the same way
    who = f"{m.username or '(anonymous)'}@{where}"
    checks.add(login_finding(LOGIN, result, who, "[mqtt]"))
    return result if isinstance(result, MqttProbe) else None


async def _login(config: EdgeConfig, tls: ssl.SSLContext | None, *, v5: bool) -> MqttProbe | Failure:
    m = config.mqtt
    return await MqttProbe.connect(
        host=m.host,
        port=m.port,
        client_id=m.client_id or f"edge-{config.device.device_id}",
        username=m.username,
        password=m.password,
        tls=tls,
        v5=v5,
    )


def _keys(checks: Checklist, config: EdgeConfig) -> None:
    keys = config.ota.trusted_keys
    if not keys:
        checks.warn(
            KEYS,
            "none: every command (model update, rollback, ping) will be rejected as unknown_key",
            "add the bridge's public key under [ota.trusted_keys] (`cloud-bridge keys generate` prints the line)",
        )
    else:
        checks.ok(KEYS, f"{len(keys)} trusted: {', '.join(sorted(keys))}")


async def _clock(checks: Checklist, config: EdgeConfig, probe: MqttProbe, clock: Callable[[], float]) -> None:
    """One clock/1 round trip through the broker to a running bridge: the device's offset, as
    edge_node/uplink/clock.py estimates it (NTP's formula on the four times)."""
    dev = config.device
    reply_topic = config.topics.device(dev.fleet_id, dev.device_id, Channel.CLOCK_REPLY)
    if not await probe.subscribe(reply_topic):
        checks.warn(
            CLOCK, f"the broker refused the subscription to {reply_topic}", "let the device read it (mosquitto/acl)"
        )
        return
    t0 = clock()
    request = ClockRequest(msg_id=new_msg_id(), fleet_id=dev.fleet_id, device_id=dev.device_id, ts=t0)
    props = None
    if probe.v5:
        props = new_properties(PacketTypes.PUBLISH)
        props.ResponseTopic = reply_topic
        props.CorrelationData = request.msg_id.encode()
    await probe.publish(
        config.topics.device(dev.fleet_id, dev.device_id, Channel.CLOCK), encode(request), properties=props
    )
    got = await probe.receive(lambda m: m.topic == reply_topic and _answers(m.payload, request.msg_id), CLOCK_WAIT_S)
    t3 = clock()
    if got is None:
        checks.warn(
            CLOCK,
            f"no cloud bridge answered a clock request within {CLOCK_WAIT_S:g}s: the clock is not checked",
            "is a cloud-bridge running for this broker and topic prefix? Keep this device's clock set (NTP): "
            "commands are checked against it",
        )
        return
    reply = decode(got.payload, ClockReply)
    offset = -(((reply.received - t0) + (reply.ts - t3)) / 2.0)  # device minus cloud
    trip = max((t3 - t0) - (reply.ts - reply.received), 0.0)
    limit = config.ota.max_clock_skew_s
    found = f"this device's clock is {offset:+.3f}s off the cloud's (round trip {trip * 1000:.0f} ms)"
    if abs(offset) > limit:
        checks.fail(
            CLOCK,
            f"{found}, beyond [ota] max_clock_skew_s = {limit:g}: every command would be rejected as expired or "
            "not yet valid",
            "set the clock right and keep it so (NTP: `timedatectl set-ntp true`, or chrony)",
        )
    else:
        checks.ok(CLOCK, f"{found}, within [ota] max_clock_skew_s = {limit:g}")


def _answers(payload: bytes, request_id: str) -> bool:
    try:
        return decode(payload, ClockReply).request_id == request_id
    except DecodeError:
        return False
