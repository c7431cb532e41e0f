"""The cloud model answers the devices' escalations: MQTT 5 request/response,
bounded concurrency, deadlines.
"""
