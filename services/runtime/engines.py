"""Which engines a stage runs, primary first: the same rule for stt, dialogue and tts.

``<STAGE>_ENGINE=auto`` picks the cloud engine when its API key is configured (in the environment or
a ``<VAR>_FILE`` secret) and the offline engine otherwise, so a fresh machine runs with no account.
``<STAGE>_FALLBACK=auto`` puts the offline engines after the primary; ``none`` runs it alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from services.runtime.config import ConfigError
from services.runtime.resilience import ProviderUnavailable

E = TypeVar("E")

log = logging.getLogger("voicebus.engines")


@dataclass(frozen=True)
class Choice:
    """A stage's engines and how its chain is chosen.

    ``preference`` orders the engines a chain falls back through (cloud first), ``local`` the ones
    that run offline, ``known`` every name the stage has (bench and test engines too).
    """

    stage: str
    preference: Sequence[str]
    local: Sequence[str]
    known: Sequence[str]

    def names(self, engine: str, fallback: str, cloud_key: bool) -> list[str]:
        """The engines to load, primary first (``auto``: the cloud engine when its key is set)."""
        primary = engine if engine != "auto" else self.preference[0] if cloud_key else self.local[0]
        if fallback == "auto":
            order = list(self.preference)
            after = order[order.index(primary) + 1 :] if primary in order else []
            rest = [n for n in after if n in self.local]
        elif fallback == "none":
            rest = []
        else:
            rest = [n.strip() for n in fallback.split(",") if n.strip()]
        names = list(dict.fromkeys([primary, *rest]))
        if unknown := [n for n in names if n not in self.known]:
            use = ", ".join(self.known)
            raise ConfigError(f"unknown {self.stage} engine {', '.join(unknown)}: use {use}")
        return names


def load_all(stage: str, names: Sequence[str], load: Callable[[str], E]) -> list[E]:
    """Load the chain's engines; one that fails to load is left out (the next may still work).

    A misconfiguration (ConfigError) stops the replica; so does a chain with no engine left.
    """
    loaded: list[E] = []
    for name in names:
        try:
            loaded.append(load(name))
        except ConfigError:
            raise
        except Exception as e:  # a missing model, a broken install
            log.error("%s engine %s failed to load: %s", stage, name, e, exc_info=True)
    if not loaded:
        raise ProviderUnavailable(stage, f"no engine could be loaded (tried {', '.join(names)})")
    log.info("%s engines: %s", stage, " -> ".join(getattr(e, "name", "?") for e in loaded))
    return loaded
