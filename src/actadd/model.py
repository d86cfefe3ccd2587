"""``LM``: a Hugging Face causal LM and its tokenizer, plus the one tokenization actadd uses.

(Loading a model by name is ``actadd.loading.load_model``.)

Sequence-start policy (``prepend_bos``): prompts *and* additions are tokenized the same way,
without the tokenizer's own special tokens, and with one start token (``lm.start_token_id``)
prepended when ``lm.prepend_bos`` is true. ``prepend_bos=None`` (the default) decides once per
model:

* the tokenizer adds a BOS by itself (Llama 3, Gemma, OPT, ...): keep it;
* the BOS token is the end-of-text token (GPT-2, GPT-NeoX): prepend it, as TransformerLens
  and the original ``activation_additions`` library did ("<|endoftext|>" at position 0);
* otherwise, if the vocabulary has an end-of-text token ``<|endoftext|>`` (SmolLM2, whose
  "BOS" is the chat token ``<|im_start|>``; Qwen), prepend that: the document boundary the
  model was trained on, shared by prompts and additions so an x-vector's position 0 cancels;
* otherwise no start token.

Why the third rule: on SmolLM2 the seed's experiments steer better with ``<|endoftext|>`` at
position 0 than with nothing (the first real token is then an attention sink, and an
addition's first token lands on it) or with ``<|im_start|>`` (docs/experiments.md, "The
sequence-start policy").

``prepend_bos=True`` prepends the tokenizer's BOS, ``False`` nothing, and a token (its text,
e.g. ``"<|endoftext|>"``, or its id) prepends that token: one shared start token on a model
whose tokenizer has no real one.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from actadd.errors import ActAddError, ModelLoadError, PromptError
from actadd.positions import Span
from actadd.sites import SiteMap, get_module, guess_site_map

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from actadd.loading import ModelSpec

__all__ = ["LM", "ChatTokens", "MessageSpan", "as_lm", "chat_messages", "default_device"]

log = logging.getLogger(__name__)


def default_device() -> torch.device:
    """CUDA when available, else Apple MPS, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


class LM:
    """A causal LM with its tokenizer. Wraps, never copies: ``lm.model`` *is* your model.

    Args:
        model: a transformers ``*ForCausalLM`` (any architecture).
        tokenizer: its tokenizer.
        prepend_bos: the sequence-start policy (see the module docstring): None decides,
            True prepends the tokenizer's BOS, False nothing, a token text or id that token.
        layers: override the discovered site map, as a dotted path to the decoder-layer
            ``ModuleList`` (e.g. ``"model.layers"``) or a full ``SiteMap``.
        name: a label used in reports and vector files.

    ``lm.spec`` is how ``load_model`` loaded it (None for a model you wrapped yourself): Ray
    workers load their replicas from it.

    Example:
        >>> from transformers import AutoModelForCausalLM, AutoTokenizer
        >>> lm = LM(AutoModelForCausalLM.from_pretrained("gpt2"),
        ...         AutoTokenizer.from_pretrained("gpt2"))  # doctest: +SKIP
        >>> lm.to_tokens("Love")  # doctest: +SKIP
        tensor([[50256, 25096]])
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: Any,
        *,
        prepend_bos: bool | str | int | None = None,
        layers: str | SiteMap | None = None,
        name: str | None = None,
    ) -> None:
        if not isinstance(model, nn.Module) or not hasattr(model, "config"):
            if isinstance(tokenizer, nn.Module):
                raise ModelLoadError(
                    "LM(model, tokenizer): the arguments are swapped (got a tokenizer, then a "
                    f"{type(tokenizer).__name__})"
                )
            raise ModelLoadError(
                f"model must be a transformers causal LM (e.g. AutoModelForCausalLM), got "
                f"{type(model).__name__}"
            )
        if not callable(getattr(tokenizer, "decode", None)):
            raise ModelLoadError(
                f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.spec: ModelSpec | None = None
        config = model.config
        self.name = name or getattr(config, "name_or_path", None) or type(model).__name__
        if isinstance(layers, str):
            guess = guess_site_map(model)
            self.site_map = SiteMap(layers, guess.attn_out, guess.mlp_out)
        else:
            self.site_map = layers or guess_site_map(model)
        layer_list = get_module(model, self.site_map.layers)
        if not isinstance(layer_list, nn.ModuleList):
            raise ModelLoadError(f"{self.site_map.layers!r} is not a ModuleList of decoder layers")
        self.layers: nn.ModuleList = layer_list
        self.n_layers = len(self.layers)
        # The module that owns the layer list receives input_ids/attention_mask/position_ids.
        parent = self.site_map.layers.rpartition(".")[0]
        self.base_model: nn.Module = get_module(model, parent) if parent else model
        embed_shape = model.get_input_embeddings().weight.shape  # [vocab, d_model]
        self.d_model = int(
            getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or 0
        ) or int(embed_shape[1])  # type: ignore[index]
        self.vocab_size = int(embed_shape[0])  # type: ignore[index]
        #: the token prepended to every prompt and addition (None: nothing)
        self.start_token_id: int | None = self._start_token(prepend_bos)
        self.prepend_bos = self.start_token_id is not None

    # -- tokenization -------------------------------------------------------------------------
    def _start_token(self, policy: bool | str | int | None) -> int | None:
        """The start token's id under ``policy`` (see the module docstring), or None."""
        tok = self.tokenizer
        bos = tok.bos_token_id
        if policy is None:
            if bos is not None and self._bos_is_a_start(bos):
                return int(bos)
            eot = tok.get_vocab().get("<|endoftext|>")
            return None if eot is None else int(eot)
        if isinstance(policy, bool):
            if policy and bos is None:
                raise PromptError(
                    "prepend_bos=True but this tokenizer has no BOS token: pass the token to "
                    "prepend instead, e.g. prepend_bos='<|endoftext|>'"
                )
            return int(bos) if policy else None
        if isinstance(policy, int):
            self.check_token_ids([policy])
            return int(policy)
        if isinstance(policy, str):
            ids = tok(policy, add_special_tokens=False).input_ids
            if len(ids) != 1:
                raise PromptError(
                    f"prepend_bos={policy!r} is {len(ids)} tokens for this tokenizer; give one "
                    "token, e.g. its end-of-text token"
                )
            return int(ids[0])
        raise PromptError(
            f"prepend_bos must be None, True, False, a token or a token id, got {policy!r}"
        )

    def _bos_is_a_start(self, bos: int) -> bool:
        tok = self.tokenizer
        if tok("a", add_special_tokens=True).input_ids[:1] == [bos]:
            return True  # the tokenizer adds it itself
        return bool(tok.bos_token == tok.eos_token)  # GPT-2's <|endoftext|>

    def token_ids(self, text: str, *, allow_empty: bool = False) -> list[int]:
        """Token ids of ``text`` under the sequence-start policy, as a list."""
        if not isinstance(text, str):
            raise PromptError(f"expected a string prompt, got {type(text).__name__}")
        ids: list[int] = self.tokenizer(text, add_special_tokens=False).input_ids
        if self.start_token_id is not None:
            ids = [self.start_token_id, *ids]
        if not ids and not allow_empty:
            raise PromptError(
                "empty prompt: give at least one token of text (or use prepend_bos=True)"
            )
        return ids

    def to_tokens(self, text: str) -> torch.Tensor:
        """``LongTensor[1, n]`` on the model's device; the same for prompts and additions."""
        return torch.tensor([self.token_ids(text)], dtype=torch.long, device=self.device)

    def to_single_token(self, text: str) -> int:
        """The id of ``text`` if it is exactly one token (no BOS), else a ``PromptError``."""
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise PromptError(f"{text!r} is {len(ids)} tokens, not one: {ids}")
        return int(ids[0])

    def to_string(self, tokens: torch.Tensor | list[int]) -> str:
        ids = tokens.tolist() if isinstance(tokens, torch.Tensor) else tokens
        return str(self.tokenizer.decode(ids))

    def to_str_tokens(self, text_or_ids: str | list[int]) -> list[str]:
        ids = self.token_ids(text_or_ids) if isinstance(text_or_ids, str) else text_or_ids
        return [self.tokenizer.decode([i]) for i in ids]

    def check_token_ids(self, ids: list[int]) -> None:
        """Reject ids that this model's vocabulary does not have (a different tokenizer)."""
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise PromptError(
                f"token ids {bad[:5]} are outside this model's vocabulary (size "
                f"{self.vocab_size}): were they made with another tokenizer? Use lm.to_tokens()"
            )

    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        for cand in (tok.pad_token_id, tok.eos_token_id, 0):
            if cand is not None:
                return int(cand)
        return 0

    def chat_tokens(self, messages: Any, *, add_generation_prompt: bool = True) -> ChatTokens:
        """The chat template's tokens for ``messages`` and where each message's content is
        (``ChatTokens.last_user`` is where chat steering lands); see ``_chat_tokens``."""
        return _chat_tokens(self, messages, add_generation_prompt=add_generation_prompt)

    def encode_with_answer(self, prompt: str, answer: str) -> tuple[list[int], int]:
        """Token ids of ``prompt + answer`` and where the answer starts.

        The prompt is tokenized as a prompt (``token_ids``) and the answer on its own, so the
        boundary is exact; with no prompt the answer is a whole text starting at 0.
        """
        if not prompt:
            return self.token_ids(answer), 0
        head = self.token_ids(prompt)
        tail = list(self.tokenizer(answer, add_special_tokens=False).input_ids)
        if not tail:
            raise PromptError(f"answer {answer!r} has no tokens")
        return head + tail, len(head)

    def pad(
        self, rows: Sequence[Sequence[int]], *, side: str = "left"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The one batch builder: ``(input_ids, attention_mask)``, each ``[B, T]``, on the
        model's device, padded with ``pad_token_id``.

        Left padding is for generation (every row's next token comes at the end); right
        padding for scoring whole texts (a causal model's real tokens never see the pads after
        them, and positions stay ``0..n-1`` without ``position_ids``).
        """
        if side not in ("left", "right"):
            raise ValueError(f"side must be 'left' or 'right', got {side!r}")
        if not rows or any(len(r) == 0 for r in rows):
            raise PromptError("every row of a batch needs at least one token")
        width = max(len(r) for r in rows)
        ids, mask = [], []
        for r in rows:
            fill = width - len(r)
            pads, ones = [self.pad_token_id] * fill, [1] * len(r)
            ids.append(pads + list(r) if side == "left" else list(r) + pads)
            mask.append([0] * fill + ones if side == "left" else ones + [0] * fill)
        dev = self.device
        return (
            torch.tensor(ids, dtype=torch.long, device=dev),
            torch.tensor(mask, dtype=torch.long, device=dev),
        )

    def batch_tokens(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ``(input_ids, attention_mask)`` of prompts, each ``[B, T]``."""
        return self.pad([self.token_ids(p) for p in prompts])

    # -- facts about the model ------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where inputs go: the first parameter's device that holds data. Modules that
        accelerate offloads to disk keep ``meta`` parameters (their hooks load the weights
        and move inputs), so those are skipped."""
        for p in self.model.parameters():
            if p.device.type != "meta":
                return p.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def fingerprint(self) -> str:
        """Shape and tokenizer identity, for checking that a vector file fits this model."""
        vocab = sorted(self.tokenizer.get_vocab().items(), key=lambda kv: kv[1])
        h = hashlib.sha256(repr(vocab).encode())
        h.update(f"{self.n_layers}:{self.d_model}:{self.prepend_bos}".encode())
        if self.start_token_id is not None and self.start_token_id != self.tokenizer.bos_token_id:
            h.update(f":start={self.start_token_id}".encode())  # a start token other than BOS
        return h.hexdigest()[:16]

    def _start_text(self) -> str | None:
        sid = self.start_token_id
        return None if sid is None else str(self.tokenizer.convert_ids_to_tokens(sid))

    def __repr__(self) -> str:
        return (
            f"LM({self.name!r}, n_layers={self.n_layers}, d_model={self.d_model}, "
            f"start_token={self._start_text()!r}, device={self.device})"
        )


def as_lm(obj: Any, param: str = "model") -> LM:
    """``obj`` if it is an ``LM``; otherwise an error that says how to make one."""
    if isinstance(obj, LM):
        return obj
    name = type(obj).__name__
    if hasattr(obj, "config") and hasattr(obj, "generate"):
        hint = "wrap it with its tokenizer: actadd.LM(model, tokenizer)"
    elif hasattr(obj, "encode") and hasattr(obj, "decode"):
        hint = "that is a tokenizer; pass actadd.LM(model, tokenizer)"
    else:
        hint = "load one with actadd.load_model() or wrap yours: actadd.LM(model, tokenizer)"
    raise ModelLoadError(f"{param} must be an actadd.LM, got {name}: {hint}")


# -- chat templates -------------------------------------------------------------------------------
# Instruction-tuned models are prompted through a chat template that wraps the user's words in
# role markers and, often, a system prompt. Steering meant for what the user wrote should land
# there, not on the template's tokens: LM.chat_tokens renders the messages and records, for
# each message, the token span of its content.
ROLES = ("system", "developer", "user", "assistant")


@dataclass(frozen=True)
class MessageSpan:
    """Where message ``index`` (of ``role``) has its content: tokens ``[start, end)``."""

    index: int
    role: str
    start: int
    end: int


@dataclass(frozen=True)
class ChatTokens:
    """The chat template's tokens (with the assistant's turn opened) and each message's span."""

    ids: tuple[int, ...]
    messages: tuple[MessageSpan, ...]
    text: str

    @property
    def last_user(self) -> Span:
        """The span of the last user message's content: where steering lands by default."""
        users = [m for m in self.messages if m.role == "user"]
        if not users:
            raise PromptError(
                "a chat prompt without a user message: steering lands on the last user "
                "message's content; add one ({'role': 'user', 'content': ...})"
            )
        return users[-1].start, users[-1].end


def chat_messages(messages: Any) -> list[dict[str, str]]:
    """Messages as ``{"role", "content"}`` dicts with text content, checked."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise ActAddError("messages must be a non-empty list of {'role': ..., 'content': ...}")
    out = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, Mapping) else getattr(m, "role", None)
        content = m.get("content") if isinstance(m, Mapping) else getattr(m, "content", None)
        if role not in ROLES:
            raise ActAddError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        if isinstance(content, list):  # OpenAI content parts: text only
            if any(not isinstance(p, Mapping) or p.get("type") != "text" for p in content):
                raise ActAddError(f"messages[{i}].content: only text parts are supported")
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise ActAddError(f"messages[{i}].content must be text, got {type(content).__name__}")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def _chat_tokens(lm: LM, messages: Any, *, add_generation_prompt: bool = True) -> ChatTokens:
    """Render ``messages`` with the model's chat template; find each message's content.

    A model without a chat template gets a plain transcript (``role: content`` lines, then
    ``assistant:``). The content of message ``i`` is looked up in the rendered text after the
    previous message's (templates may trim it); a template that rewrites a message beyond
    recognition raises instead of guessing.

    Example:
        >>> ct = lm.chat_tokens([{"role": "user", "content": "Hi there"}])  # doctest: +SKIP
        >>> lm.to_string(list(ct.ids[slice(*ct.last_user)]))  # doctest: +SKIP
        'Hi there'
    """
    turns = chat_messages(messages)
    tok = lm.tokenizer
    if getattr(tok, "chat_template", None):
        try:
            text = tok.apply_chat_template(
                turns, add_generation_prompt=add_generation_prompt, tokenize=False
            )
        except Exception as e:  # templates raise on roles or orders they do not know
            raise ActAddError(f"the model's chat template rejected the messages: {e}") from e
    else:
        text = "".join(f"{t['role']}: {t['content']}\n" for t in turns)
        text += "assistant:" if add_generation_prompt else ""
    chars = []
    cursor = 0
    for i, t in enumerate(turns):
        needle = t["content"].strip()
        at = text.find(needle, cursor) if needle else cursor
        if at < 0:
            raise ActAddError(
                f"cannot find message {i}'s text in what the chat template made of it: the "
                "template rewrites it, so where to steer is unclear"
            )
        chars.append((at, at + len(needle)))
        cursor = at + len(needle)
    ids, offsets = _tokens_with_offsets(lm, text)
    spans = []
    for i, ((a, b), t) in enumerate(zip(chars, turns, strict=True)):
        inside = [k for k, (s, e) in enumerate(offsets) if s < b and e > a and e > s]
        start, end = (inside[0], inside[-1] + 1) if inside else (0, 0)
        spans.append(MessageSpan(i, t["role"], start, end))
    return ChatTokens(tuple(ids), tuple(spans), text)


def _tokens_with_offsets(lm: LM, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of ``text`` (its special tokens are text) and each token's character span."""
    tok = lm.tokenizer
    try:
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc.input_ids), [tuple(o) for o in enc.offset_mapping]
    except (NotImplementedError, TypeError, ValueError):  # a slow tokenizer: by prefixes
        ids = list(tok(text, add_special_tokens=False).input_ids)
        offsets, prev = [], 0
        for k in range(1, len(ids) + 1):
            end = len(tok.decode(ids[:k]))
            offsets.append((prev, end))
            prev = end
        return ids, offsets
