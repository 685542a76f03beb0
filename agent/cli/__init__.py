"""Entry points: the daemon (``xpu-agent``) and the client (``xpuctl``)."""
