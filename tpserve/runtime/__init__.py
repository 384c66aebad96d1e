"""Where ranks run and how they talk: the comm interface and its data paths, the ZMQ coordinator,
the rank worker, the in-process and Ray executors, the wire format."""
