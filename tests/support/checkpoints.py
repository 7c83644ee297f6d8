"""What a stage checkpointed for a session, read by watching the state bucket (no polling)."""

from __future__ import annotations

from collections.abc import Callable

from proto import codec
from proto import subjects as sj
from proto.state import DialogueState
from proto.system import Checkpoint
from services.runtime.bus import Bus


async def saved_state(
    bus: Bus, session: str, until: Callable[[DialogueState], bool], timeout_s: float = 15.0
) -> DialogueState:
    """The dialogue's checkpoint of ``session``, once one satisfies ``until``.

    Raises TimeoutError when no checkpoint comes within ``timeout_s`` of the last one.
    """
    watcher = await bus.kv[sj.STATE_BUCKET].watch(sj.state_key("dialogue", session))
    try:
        while True:
            entry = await watcher.updates(timeout=timeout_s)
            if entry is None or not entry.value:
                continue
            state = codec.decode_record(DialogueState, codec.decode_record(Checkpoint, entry.value).state)
            if until(state):
                return state
    finally:
        await watcher.stop()
