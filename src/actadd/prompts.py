"""The one normaliser of prompts: text, text as chat, and chats, into token ids and a span.

Generation, sweeps, the CLI and the server all turn what the user gave into ``Encoded``
prompts here: plain strings are prompts as they are (tokenized with the sequence-start policy,
``LM.token_ids``); with ``chat=True`` a string is one user message; a list of messages is a
chat, rendered with the model's template (``LM.chat_tokens``). A chat's additions land on its
last user message (``span``), never on the template's own tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from actadd.errors import PromptError
from actadd.model import LM, chat_messages
from actadd.positions import Span

__all__ = ["Encoded", "encode_prompts"]


@dataclass(frozen=True)
class Encoded:
    """One prompt as the model gets it: token ids, the span additions refer to (None: all of
    it) and a text to show for it."""

    ids: tuple[int, ...]
    span: Span | None
    shown: str


def encode_prompts(lm: LM, prompts: Any, *, chat: bool = False) -> list[Encoded]:
    """The one normaliser of prompts: a string, a list of strings, a list of messages, or a
    list of such lists. Strings are prompts as they are, or, with ``chat=True``, one user
    message each; message lists are always chats. Chats steer their last user message.

    Example:
        >>> [e.span for e in encode_prompts(lm, ["Hi"], chat=True)]  # doctest: +SKIP
        [(21, 22)]
    """
    if isinstance(prompts, str) or _is_messages(prompts):
        prompts = [prompts]
    items = list(prompts)
    if not items:
        raise PromptError("no prompts: give at least one")
    out = []
    for p in items:
        if isinstance(p, str):
            if not p:
                raise PromptError("every prompt must be a non-empty string")
            if not chat:
                out.append(Encoded(tuple(lm.token_ids(p)), None, p))
                continue
            p = [{"role": "user", "content": p}]
        ct = lm.chat_tokens(p)
        span = ct.last_user
        if span[1] <= span[0]:
            raise PromptError("the last user message is empty: give it some text to steer")
        last = [m for m in chat_messages(p) if m["role"] == "user"][-1]["content"]
        out.append(Encoded(ct.ids, span, last))
    return out


def _is_messages(x: Any) -> bool:
    return (
        isinstance(x, Sequence)
        and not isinstance(x, str)
        and bool(x)
        and all(isinstance(m, Mapping) and "role" in m for m in x)
    )
