"""Enforcement: pure policy (slices + samples → actions), thin actions, and the loop."""
