"""dialogue engines: the interface and its implementations."""
