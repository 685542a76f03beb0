"""NVIDIA GPUs over NVML: :func:`create` builds the backend (see ``backend.py``).

Only ``binding.py`` imports ``pynvml``; this package imports nothing at load time so that
nodes without NVIDIA drivers pay nothing for it.
"""
