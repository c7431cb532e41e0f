"""`cloud-bridge check`: diagnose a bridge's configuration, files, databases and broker, one line per check.

In order: the config loads; the state directory and the model store are writable with disk to
spare; the signing key loads; the escalation model and the reference models load as classifiers;
the registry is reachable and of this version's layout (inspected, never changed); the TSDB takes a
probe point; the broker is reachable, its TLS certificate verifies and is not near expiry, the
credentials log in, and a shared subscription delivers. Shared probes are common/checks.py's; the
CLI (cloud_bridge/cli/check.py) prints the report.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
import uuid
from pathlib import Path

from sqlalchemy import inspect
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import create_async_engine

from cloud_bridge.config import BridgeConfig, MqttConfig, load_config
from cloud_bridge.errors import ConfigError, ModelError, ReferenceModelError
from cloud_bridge.escalation.session import session_config
from cloud_bridge.ota.keys import load_signer
from cloud_bridge.registry import Base
from cloud_bridge.registry.migrations import NEW_COLUMNS
from cloud_bridge.tsdb.api import WriteApi
from cloud_bridge.tsdb.lines import line
from cloud_bridge.tsdb.transport import HttpTransport
from common.checks import Checklist, Finding, MqttProbe, login_finding, probe_dir, probe_tcp, probe_tls
from common.mqtt import Failure
from common.onnx import load_model
from common.tls import client_context
from schemas.topics import Topics

CONFIG, STATE_DIR, MODEL_STORE, SIGNING_KEY = "config", "state dir", "model store", "signing key"
ESCALATION_MODEL, REFERENCE_MODELS, REGISTRY, TSDB = "escalation model", "reference models", "registry", "tsdb"
BROKER, TLS, LOGIN, SHARED = "broker reachable", "tls", "mqtt login", "shared subscription"
ESCALATION_SESSION = "escalation session"
ALL = (
    CONFIG,
    STATE_DIR,
    MODEL_STORE,
    SIGNING_KEY,
    ESCALATION_MODEL,
    REFERENCE_MODELS,
    REGISTRY,
    TSDB,
    BROKER,
    TLS,
    LOGIN,
    SHARED,
    ESCALATION_SESSION,
)
SHARED_WAIT_S = 3.0
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


async def diagnose(path: Path) -> Checklist:
    """Run every check against the bridge configuration file at `path`."""
    checks = Checklist()
    try:
        config = load_config(path)
    except ConfigError as exc:
        checks.fail(CONFIG, str(exc), f"edit {path} (examples/cloud.toml documents every key)")
        checks.skip_all(ALL[1:], "the configuration does not load")
        return checks
    m = config.mqtt
    checks.ok(CONFIG, f"{path}: broker={m.host}:{m.port} client_id={m.client_id} state_dir={config.state_dir}")
    spill = config.influx.spill_max_bytes if config.influx.url else 0
    checks.add(probe_dir(STATE_DIR, Path(config.state_dir), "state_dir", need_bytes=spill))
    checks.add(probe_dir(MODEL_STORE, config.model_store_dir, "[ota] model_store"))
    _signing_key(checks, config)
    await asyncio.to_thread(_models, checks, config)
    await _registry(checks, config)
    await _tsdb(checks, config)
    probe = await _broker(checks, config)
    if probe is None:
        checks.skip(SHARED, "no MQTT connection")
        checks.skip(ESCALATION_SESSION, "no MQTT connection")
        return checks
    try:
        await _shared(checks, config, probe)
        await _escalation_session(checks, config, probe)
    finally:
        await probe.close()
    return checks


def _signing_key(checks: Checklist, config: BridgeConfig) -> None:
    path = config.ota.signing_key
    if path is None:
        checks.ok(SIGNING_KEY, "none configured: the bridge serves model chunks but sends no commands")
        return
    try:
        signer = load_signer(Path(path), config.ota.key_id)
    except ConfigError as exc:
        checks.fail(
            SIGNING_KEY,
            f"{path}: {exc}",
            "point [ota] signing_key at the private key (command-signing.pem) that `cloud-bridge keys generate "
            "--out DIR` writes; the .pub file beside it is the public half, for devices",
        )
        return
    checks.ok(SIGNING_KEY, f"{path}: Ed25519, key id {signer.key_id}")


def _models(checks: Checklist, config: BridgeConfig) -> None:
    model = config.escalation.model
    if model is None:
        checks.ok(ESCALATION_MODEL, "none configured: escalations are not answered (devices keep their answer)")
    else:
        try:
            loaded = load_model(Path(model), error=ModelError, providers=config.escalation.providers)
        except ModelError as exc:
            checks.fail(ESCALATION_MODEL, str(exc), "point [escalation] model at the cloud ONNX classifier")
        else:
            card = loaded.card
            on = ", ".join(loaded.providers.active)
            checks.ok(ESCALATION_MODEL, f"{card.name} {card.version} ({model}): {len(card.labels)} classes, on {on}")
    files: list[Path] = []
    for entry in config.drift.reference_models:
        files.extend(sorted(Path(entry).glob("*.onnx")) if Path(entry).is_dir() else [Path(entry)])
    if not files:
        checks.ok(REFERENCE_MODELS, "none configured: drift baselines come from the registry's models or early windows")
        return
    without_mix = []
    for file in files:
        try:
            card = load_model(file, error=ReferenceModelError).card
        except ReferenceModelError as exc:
            checks.fail(REFERENCE_MODELS, str(exc), "list ONNX classifiers in [drift] reference_models")
            return
        if card.reference_class_mix is None:
            without_mix.append(file.name)
    if without_mix:
        checks.warn(
            REFERENCE_MODELS,
            f"{len(files)} load; without reference_class_mix metadata (skipped for drift): {', '.join(without_mix)}",
            "add the training class mix as metadata reference_class_mix (README 'Bring your own model')",
        )
    else:
        checks.ok(REFERENCE_MODELS, f"{len(files)} load, each with its reference class mix")


# ---- registry ---------------------------------------------------------------------------------
def _behind(conn: Connection) -> tuple[list[str], list[str]]:
    """What start-up migrates (tables, known new columns, the old results layout), and what it cannot."""
    inspector = inspect(conn)
    migrated: list[str] = []
    blocking: list[str] = []
    addable = {(table, column) for table, column, _ in NEW_COLUMNS}
    for table in Base.metadata.sorted_tables:
        if not inspector.has_table(table.name):
            migrated.append(f"table {table.name} is missing")
            continue
        have = {c["name"] for c in inspector.get_columns(table.name)}
        missing = [c.name for c in table.columns if c.name not in have]
        if table.name == "results" and "seq" in missing:
            if inspector.has_table("results_v1"):
                blocking.append("results has the old layout and results_v1 exists (rename or drop one of them)")
            else:
                migrated.append("results has the old layout (renamed to results_v1 at start)")
            continue
        for column in missing:
            (migrated if (table.name, column) in addable else blocking).append(f"{table.name}.{column} is missing")
    return migrated, blocking


async def _registry(checks: Checklist, config: BridgeConfig) -> None:
    url = config.registry_url
    shown = re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)
    if url.startswith("sqlite"):
        db = Path(url.split(":///", 1)[-1])
        if not await asyncio.to_thread(db.is_file):
            checks.ok(REGISTRY, f"SQLite {db} does not exist yet: `cloud-bridge run` creates it")
            return
    connect_args = {"timeout": 5} if url.startswith("postgresql") else {}
    engine = create_async_engine(url, connect_args=connect_args)
    try:
        async with engine.connect() as conn:
            migrated, blocking = await conn.run_sync(_behind)
    except (SQLAlchemyError, OSError) as exc:
        checks.fail(REGISTRY, f"{shown}: {str(exc).splitlines()[0]}", "check [registry] url and that the database runs")
        return
    finally:
        await engine.dispose()
    if blocking:
        checks.fail(REGISTRY, f"{shown}: {'; '.join(blocking)}", "the bridge cannot migrate this: sort it out by hand")
    elif migrated:
        checks.warn(
            REGISTRY,
            f"{shown} is behind this version: {'; '.join(migrated)}",
            "nothing to do by hand: it will be migrated at start (back it up first if you may go back)",
        )
    else:
        checks.ok(REGISTRY, f"{shown}: reachable, layout up to date")


# ---- tsdb -------------------------------------------------------------------------------------
async def _tsdb(checks: Checklist, config: BridgeConfig) -> None:
    influx = config.influx
    if influx.url is None:
        checks.ok(TSDB, "not configured ([influx] url): no series for Grafana")
        return
    api = WriteApi.build(
        url=influx.url,
        api=influx.api,
        database=influx.database,
        retention_policy=influx.retention_policy,
        org=influx.org,
        bucket=influx.bucket,
        token=influx.token,
        username=influx.username,
        password=influx.password,
    )
    point = line("bridge_check", {"bridge": config.mqtt.client_id}, {"ok": 1}, round(time.time() * 1000))
    transport = HttpTransport(influx.url, timeout_s=5.0)
    try:
        answer = await asyncio.to_thread(transport.post, api.target, point.encode(), api.headers)
    except OSError as exc:
        checks.fail(TSDB, f"{influx.url}: no answer ({exc})", "check [influx] url, and that InfluxDB runs")
        return
    finally:
        transport.close()
    verdict = api.verdict(answer)
    if verdict.kind == "ok":
        checks.ok(TSDB, f"{influx.url} ({influx.api}) took a probe point into {api.destination}")
        return
    said, _, fix = verdict.detail.partition(": ")
    checks.fail(TSDB, f"{influx.url} ({influx.api}) {api.destination}: {said}", fix or "check the [influx] settings")


# ---- broker -----------------------------------------------------------------------------------
async def _broker(checks: Checklist, config: BridgeConfig) -> MqttProbe | None:
    m = config.mqtt
    where = f"{m.host}:{m.port}"
    checks.add(await probe_tcp(BROKER, m.host, m.port, "[mqtt]"))
    tls: ssl.SSLContext | None = None
    if m.tls_ca is None:
        checks.ok(TLS, f"not configured: plain MQTT to {where} (set [mqtt] tls_ca to encrypt)")
    else:
        try:
            tls = client_context(m.tls_ca, error=ConfigError)
        except ConfigError as exc:
            checks.fail(TLS, str(exc), "fix the file, or [mqtt] tls_ca")
        else:
            if checks.passed(BROKER):
                checks.add(await probe_tls(TLS, m.host, m.port, tls, "[mqtt]"))
            else:
                checks.skip(TLS, f"{where} is not reachable")
    if not checks.passed(BROKER) or not checks.passed(TLS):
        checks.skip(LOGIN, f"{where} is not reachable" if not checks.passed(BROKER) else "the TLS check failed")
        return None
    result = await _login(m, tls)
    checks.add(login_finding(LOGIN, result, f"{m.username or '(anonymous)'}@{where}", "[mqtt]"))
    return None if isinstance(result, Failure) else result


async def _login(m: MqttConfig, tls: ssl.SSLContext | None) -> MqttProbe | Failure:
    """Log in as `m` says (the [mqtt] login or the escalation session's)."""
    return await MqttProbe.connect(
        host=m.host,
        port=m.port,
        client_id=m.client_id,
        username=m.username,
        password=m.password,
        tls=tls,
        v5=m.protocol == "mqtt5",
    )


async def _escalation_session(checks: Checklist, config: BridgeConfig, main: MqttProbe) -> None:
    """The escalation session's login (its own account, if it has one) and its $share check. A broker
    that makes the username the client id gives it the [mqtt] login's session: the second login takes
    the first over, and the running bridge's two sessions would keep taking each other's."""
    esc = config.escalation
    if esc.model is None or esc.session != "own":
        why = "no [escalation] model" if esc.model is None else "on the [mqtt] session ([escalation] session = shared)"
        checks.ok(ESCALATION_SESSION, f"no session of its own: {why}")
        return
    m = session_config(config)
    tls = None if m.tls_ca is None else client_context(m.tls_ca, error=ConfigError)
    where = f"{m.host}:{m.port}"
    result = await _login(m, tls)
    if isinstance(result, Failure):
        checks.add(login_finding(ESCALATION_SESSION, result, f"{m.username or '(anonymous)'}@{where}", "[escalation]"))
        return
    try:
        try:
            await main.publish(f"{config.fleet.prefix}/_check/{_UNSAFE.sub('_', m.client_id)}/alive", b"")
        except (ConnectionError, TimeoutError):
            checks.fail(
                ESCALATION_SESSION,
                f"logging in as {m.username or '(anonymous)'} for the escalation session ended the [mqtt] login: the "
                "broker gives both one client id (e.g. Mosquitto's use_username_as_clientid)",
                "give the escalation session an account of its own ([escalation] username and password, a user "
                'block in mosquitto/acl), or set [escalation] session = "shared"',
            )
            return
        await _shared(checks, config, result, ESCALATION_SESSION, m.client_id)
    finally:
        await result.close()


async def _shared(
    checks: Checklist, config: BridgeConfig, probe: MqttProbe, name: str = SHARED, client_id: str | None = None
) -> None:
    fleet = config.fleet
    if not fleet.shared:
        checks.ok(name, "not used ([fleet] shared = false): every bridge takes every message")
        return
    me = _UNSAFE.sub("_", client_id or config.mqtt.client_id)
    # A topic and a share group of this bridge's own: no device or other bridge sees the probe.
    topic = f"{fleet.prefix}/_check/{me}/{uuid.uuid4().hex}"
    group = f"{fleet.share_group}-check-{me}"
    if not await probe.subscribe(Topics.shared(group, topic)):
        checks.fail(
            name,
            f"the broker refused the subscription $share/{group}/{topic}",
            f"allow the bridge's user to read and write {fleet.prefix}/# (mosquitto/acl), and a broker with shared "
            "subscriptions (MQTT 5; Mosquitto 1.6+)",
        )
        return
    await probe.publish(topic, b"shared-subscription-check")
    got = await probe.receive(lambda message: message.topic == topic, SHARED_WAIT_S)
    if got is None:
        found = f"a QoS 1 message to {topic} did not arrive through $share/{group}/ within {SHARED_WAIT_S:g}s"
        if fleet.shared_fallback:
            # The bridge then subscribes without $share: it runs, but every bridge takes every message.
            found += "; the bridge will subscribe without $share ([fleet] shared_fallback = true)"
        checks.add(
            Finding(
                name,
                "warn" if fleet.shared_fallback else "fail",
                found,
                f"let the bridge's user read and write {fleet.prefix}/# (mosquitto/acl: a broker grants a subscription "
                "its ACL then starves), on a broker that delivers shared subscriptions (Mosquitto 1.6+); or set "
                "[fleet] shared = false when only one bridge runs",
            )
        )
        return
    checks.ok(name, f"$share/{fleet.share_group}/... delivers (probe on $share/{group}/)")
