"""Series for Grafana: line protocol formatted here, written in batches to InfluxDB,
spilled to disk while it is down.
"""
