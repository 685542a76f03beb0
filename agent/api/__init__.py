"""HTTP/1.1 + JSON over the local Unix socket. ``schema`` is shared with the client."""
