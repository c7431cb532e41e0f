"""Real local servers (mosquitto, victoria-metrics, InfluxDB 1.x), a fault-injecting TCP proxy and the
child-process lifecycle they share, for tests, bench and demo."""

from devservers._process import ManagedProcess, ProcessError
from devservers.influxdb import InfluxDB, InfluxDBError, find_influxd
from devservers.mosquitto import Listener, Mosquitto, MosquittoError, find_mosquitto
from devservers.ports import PortWaitError, free_port, free_ports, wait_for_port
from devservers.tcpproxy import ProxyStats, TcpProxy
from devservers.victoria import ExportedSeries, VictoriaError, VictoriaMetrics, find_victoria_metrics

__all__ = [
    "ExportedSeries",
    "InfluxDB",
    "InfluxDBError",
    "Listener",
    "ManagedProcess",
    "Mosquitto",
    "MosquittoError",
    "PortWaitError",
    "ProcessError",
    "ProxyStats",
    "TcpProxy",
    "VictoriaError",
    "VictoriaMetrics",
    "find_influxd",
    "find_mosquitto",
    "find_victoria_metrics",
    "free_port",
    "free_ports",
    "wait_for_port",
]
