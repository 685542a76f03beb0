"""Reproducible benchmarks of the agent's own code (run as ``python -m benchmarks.<name>``)."""
