"""Device messages in: validated against schemas/, deduplicated by msg_id, stored
in one registry transaction per batch, then acknowledged to the broker.
"""
