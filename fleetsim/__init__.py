"""fleetsim: a simulated fleet of edge devices for sizing the cloud side (`python -m fleetsim --help`).

Thousands of devices over a few MQTT 5 connections per process, speaking the wire contract of
schemas/ in the compact encoding as edge nodes do by default: status births, result/2 messages of
coalesced answers, telemetry windows with per-device class mixes and feature profiles (a share of
devices drifting), escalations that await the cloud model's answer, uncertain samples within the
edge's budget, command acks, and the bridges' delivery confirmations counted per device.

- profile.py: what each device does (rates, shares);
- device.py: per-device state and the messages it sends; wire.py: their compact frames, cheaply;
- mqtt5.py: the connections (batched QoS 1 publishes); inbound.py: replies, commands, confirmations;
- sim.py: one process's schedule; worker.py: that process; runner.py: several of them;
- report.py: progress lines and the verdict; cli.py: the command line; options.py: what is passed.

bench/fleet.py uses it against its own broker and bridges; docs/scaling.md ("Sizing your own
fleet") says how to use it against yours.
"""

__version__ = "1.0.0"
