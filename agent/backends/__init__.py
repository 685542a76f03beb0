"""Device backends: each knows one kind of device and nothing about slices."""
