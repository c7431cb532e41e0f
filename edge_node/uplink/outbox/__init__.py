"""The durable SQLite outbox every outbound message is committed to before the link sends it:
an async facade over an in-memory page index, a group-committing writer thread and the file."""

from edge_node.uplink.message import OutMessage, Priority, Stored
from edge_node.uplink.outbox.facade import Outbox

__all__ = ["OutMessage", "Outbox", "Priority", "Stored"]
