"""Cloud bridge: ingests the fleet's MQTT traffic into a registry and InfluxDB, answers escalations,
detects drift, signs OTA commands and drives canary rollouts."""

__version__ = "0.1.0"
