"""The voicebus contract: events, subjects, codec and the records kept on the bus."""

from proto.events import SCHEMA_VERSION

__all__ = ["SCHEMA_VERSION"]
