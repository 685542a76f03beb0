"""The node's core: inventory, slices, events. The API, the bus and the CLI sit on top."""
