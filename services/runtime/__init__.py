"""The runtime every stage shares: bus, ownership, service lifecycle, tracing, metrics, health, config."""
