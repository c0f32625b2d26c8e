"""One module per compression technique; each exposes a step generator (see compression.pipeline)."""
