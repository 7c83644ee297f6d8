"""tts engines: the interface and its implementations."""
