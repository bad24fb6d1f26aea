"""LLM instruction / chat records -> a list of (role, text) turns.

Formats: Alpaca and BELLE (instruction / input / output, optional system and history), ShareGPT
(`conversations` with from/value or role/content), OpenAI-style `messages` (role/content, content may
be a list of parts), LLaMA-Factory DPO (`chosen` appended as the answer) and KTO (`label` false marks an
undesirable answer). Roles are normalised to system / user / assistant / tool.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from conan_core.errors import ConanError

SYSTEM, USER, ASSISTANT, TOOL = "system", "user", "assistant", "tool"

_ROLE_NAMES = {
    "system": SYSTEM,
    "human": USER, "user": USER, "prompter": USER,
    "gpt": ASSISTANT, "assistant": ASSISTANT, "bot": ASSISTANT, "chatgpt": ASSISTANT, "model": ASSISTANT,
    # Tool traffic: a function call is the assistant speaking JSON, an observation is the tool's output.
    "function_call": ASSISTANT, "observation": TOOL, "tool": TOOL, "function": TOOL, "ipython": TOOL,
}


class ConversationError(ConanError):
    """A chat record is missing the fields its format needs; the message is the quarantine reason."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class Turn:
    role: str
    text: str | None  # None: the turn had no text content (an image, a tool payload object, ...)
    is_tool_call: bool = False  # assistant turn that calls a function (`function_call` / `tool_calls`)


def _content_text(content: Any) -> str | None:
    """Text of a message content: a string, or a list of parts of which all are text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        texts = [part.get("text") if isinstance(part, dict) and part.get("type") == "text" else None
                 for part in content]
        if all(isinstance(text, str) for text in texts):
            return "\n".join(texts)  # type: ignore[arg-type]
    return None


def _turn(role_name: Any, content: Any, *, tool_calls: bool = False) -> Turn:
    role = _ROLE_NAMES.get(str(role_name).strip().lower())
    if role is None:
        raise ConversationError("unknown_role", str(role_name)[:40])
    is_tool_call = tool_calls or str(role_name).strip().lower() == "function_call"
    return Turn(role=role, text=_content_text(content), is_tool_call=is_tool_call)


def _alpaca_turns(item: dict) -> list[Turn]:
    instruction, extra, output = item.get("instruction"), item.get("input") or "", item.get("output")
    if not isinstance(instruction, str) or not isinstance(output, str) or not isinstance(extra, str):
        raise ConversationError("missing_field", "instruction/output")
    turns = [Turn(SYSTEM, item["system"])] if isinstance(item.get("system"), str) else []
    for pair in item.get("history") or []:
        if isinstance(pair, list | tuple) and len(pair) == 2:
            turns += [Turn(USER, _content_text(pair[0])), Turn(ASSISTANT, _content_text(pair[1]))]
    prompt = f"{instruction}\n{extra}" if extra.strip() else instruction
    return turns + [Turn(USER, prompt), Turn(ASSISTANT, output)]


def _message_turns(messages: Any) -> list[Turn]:
    if not isinstance(messages, list) or not messages:
        raise ConversationError("missing_field", "conversation turns")
    turns = []
    for message in messages:
        if not isinstance(message, dict):
            raise ConversationError("malformed_turn", type(message).__name__)
        role = message.get("from", message.get("role"))
        content = message.get("value", message.get("content"))
        turns.append(_turn(role, content, tool_calls=bool(message.get("tool_calls") or
                                                            message.get("function_call"))))
    return turns


def conversation_turns(item: Any) -> list[Turn]:
    """The turns of one chat/instruction record of any supported format (ConversationError if none)."""
    if not isinstance(item, dict):
        raise ConversationError("malformed_record", f"expected an object, got {type(item).__name__}")
    if "instruction" in item or "output" in item:
        return _alpaca_turns(item)
    if "conversations" in item or "messages" in item:
        turns = _message_turns(item.get("conversations", item.get("messages")))
        chosen = item.get("chosen")
        if chosen is not None:  # DPO: the preferred answer follows the conversation
            turns.append(_turn(chosen.get("from", chosen.get("role")), chosen.get("value", chosen.get("content")))
                         if isinstance(chosen, dict) else Turn(ASSISTANT, _content_text(chosen)))
        if item.get("label") is False:  # KTO: the last answer is marked undesirable
            raise ConversationError("undesirable_response", "kto label false")
        return turns
    raise ConversationError("unknown_format", ",".join(sorted(map(str, item))[:6]))


def prompt_response_pairs(turns: list[Turn], *, context_turns: int = 0) -> list[tuple[str | None, Turn, str]]:
    """Each assistant turn paired with the user turn before it; system prompts dropped.

    Returns (prompt text or None when the user turn had no text, the assistant turn, context) where
    context joins up to `context_turns` earlier user/assistant turns (oldest first), for the option
    of including earlier turns. Assistant turns with no preceding user turn are skipped.
    """
    pairs = []
    dialogue = [turn for turn in turns if turn.role != SYSTEM]
    for index, turn in enumerate(dialogue):
        if turn.role != ASSISTANT or index == 0 or dialogue[index - 1].role != USER:
            continue
        prompt = dialogue[index - 1]
        earlier = [t for t in dialogue[max(0, index - 1 - context_turns):index - 1]
                   if t.role in (USER, ASSISTANT) and t.text] if context_turns else []
        context = "\n".join(t.text for t in earlier if t.text)
        pairs.append((prompt.text, turn, context))
    return pairs
