"""A simulated fleet for bench/fleet.py: thousands of devices over a handful of MQTT connections,
speaking the wire contract of schemas/ in the compact encoding, as edge nodes do by default.

- device.py: one simulated device (its inputs' profile, drift, counters) and the messages it sends;
- sim.py: the simulator process (connections, the 1 Hz schedule, escalation round trips, command acks);
- watch.py: what the bench measures around it (bridge CPU and RSS, registry lag, broker backlog);
- servers.py: the servers a run needs (a private PostgreSQL, the cloud model, bridge configs).
"""
