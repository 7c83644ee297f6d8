"""stt engines: the interface and its implementations."""
