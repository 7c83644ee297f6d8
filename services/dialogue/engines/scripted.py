"""A deterministic LLM for tests and golden replays: replies come from a script of regex rules.

Each rule is ``{"match": regex, "reply": text}``; the first rule whose regex is found in the caller's
last message wins, else ``You said: {text}.``. A reply may name ``{text}`` (the caller's last message),
``{messages}`` (how many messages the request held) and ``{instructions}``, which lets a test see what the
engine was given. The reply streams a word at a time, each after an optional fixed delay.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from services.dialogue.config import DialogueConfig
from services.dialogue.engines.base import LlmDelta, LlmEngine, LlmRequest, TextDelta, Usage
from services.runtime.config import ConfigError

_PLACEHOLDER = re.compile(r"\{(text|messages|instructions)\}")


@dataclass(frozen=True, slots=True)
class Rule:
    """Reply ``reply`` when ``match`` is found in the caller's last message (case-insensitive)."""

    match: re.Pattern[str]
    reply: str


DEFAULT_RULE = Rule(re.compile(""), "You said: {text}.")


def load_script(path: str) -> list[Rule]:
    """Rules from a JSON file: a list of ``{"match", "reply"}`` objects (or ``{"rules": [...]}``)."""
    try:
        raw = json.loads(Path(path).read_text())
        items = raw["rules"] if isinstance(raw, dict) else raw
        return [Rule(re.compile(item["match"], re.IGNORECASE), str(item["reply"])) for item in items]
    except (OSError, ValueError, KeyError, TypeError, re.error) as e:
        raise ConfigError(f"VB_LLM_SCRIPT={path!r} is not a usable script: {e}") from e


class ScriptedEngine(LlmEngine):
    """Replies by rule, word by word; the same request always streams the same reply."""

    name = "scripted"

    def __init__(self, rules: Sequence[Rule] = (), token_delay_s: float = 0.0) -> None:
        self.rules = [*rules, DEFAULT_RULE]
        self.token_delay_s = token_delay_s

    def reply_to(self, request: LlmRequest) -> str:
        """The reply the script gives to ``request``."""
        said = next((m.text for m in reversed(request.messages) if m.role == "user"), "")
        rule = next(r for r in self.rules if r.match.search(said))
        values = {"text": said, "messages": str(len(request.messages)), "instructions": request.instructions}
        return _PLACEHOLDER.sub(lambda m: values[m.group(1)], rule.reply)

    async def stream(self, request: LlmRequest) -> AsyncIterator[LlmDelta]:
        """The scripted reply, a word (with its leading space) per delta."""
        words = self.reply_to(request).split()
        for i, word in enumerate(words):
            if self.token_delay_s:
                await asyncio.sleep(self.token_delay_s)
            yield TextDelta(word if i == 0 else f" {word}")
        yield Usage(input_tokens=sum(len(m.text.split()) for m in request.messages), output_tokens=len(words))


def create(cfg: DialogueConfig) -> ScriptedEngine:
    """The engine named by the configuration (``VB_LLM_SCRIPT``, ``VB_LLM_SCRIPT_TOKEN_MS``)."""
    rules = load_script(cfg.llm_script) if cfg.llm_script else []
    return ScriptedEngine(rules, cfg.llm_script_token_ms / 1000)
