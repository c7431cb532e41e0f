"""Everything a device sends goes through here: the durable SQLite outbox first,
then the MQTT link that drains it (QoS 1, a window in flight, reconnects with backoff).
"""
