"""The MQTT bus: publish this node, keep the peer pool, lend and borrow (docs/mqtt.md)."""
