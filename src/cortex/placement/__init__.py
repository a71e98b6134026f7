"""Where jobs go: the fleet as seen from heartbeats, and the pure choice of a node."""
