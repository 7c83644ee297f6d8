"""voicebus services: the five stages, the shared runtime and the tools, one process per stage."""
