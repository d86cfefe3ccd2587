"""From validated request bodies to engine rows: tokens, chat template, steering, limits.

Everything here runs on the event loop before a request is queued, so bad input is answered
with a 4xx ``APIError`` naming the field (``param``) and never reaches the model thread. Only
what needs a forward pass (resolving additions, and a prompt shorter than an addition) is
checked later, by the engine, for that request alone.

Each ``steering`` entry becomes one steerable (an x-vector is one, a conditional entry is
wrapped in ``Conditioned``), so a row's ``applied`` flags line up with the request's entries.
Chat requests are steered on the last user message's text (``LM.chat_tokens``), as in Python.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from actadd.additions import ActivationAddition, get_x_vector
from actadd.batching import Request
from actadd.conditions import AllOf, AnyOf, Conditional, Not
from actadd.errors import ActAddError
from actadd.model import LM
from actadd.sampling import Sampling
from actadd.serve.schema import (
    APIError,
    ChatMessage,
    ChatRequest,
    CompletionRequest,
    ConditionSpec,
    Limits,
    SteeringSpec,
    SweepRequest,
)
from actadd.serve.stores import Store
from actadd.sites import get_act_name, parse_site
from actadd.steering import Conditioned

__all__ = ["Group", "RequestReader", "Rows", "SweepPlan"]


@dataclass(frozen=True)
class Group:
    """Steerables that count as one ``steering`` entry (an x-vector's two additions)."""

    parts: tuple[Any, ...]
    label: str

    def injections(self, lm: LM) -> list[Any]:
        return [i for p in self.parts for i in p.injections(lm)]

    def describe(self) -> str:
        return self.label


@dataclass(frozen=True)
class Rows:
    """The rows of one request, its prompt token count and the steering it asked for."""

    rows: list[Request]
    prompt_tokens: int
    steering: list[str]


@dataclass(frozen=True)
class SweepPlan:
    """Rows of a sweep; ``first[series, coeff]`` is the first of that point's ``n`` rows."""

    rows: list[Request]
    labels: list[str]
    first: dict[tuple[int, int], int]


class RequestReader:
    """Checks requests against the model and the limits, and turns them into rows.

    Args:
        lm: the model served.
        limits: what one request may ask for.
        vectors: the stored vectors ``{"vector": name}`` entries refer to.
        conditions: the stored conditions ``{"if": {"condition": name}}`` refers to.
        model_id: the only ``model`` value accepted (besides none).
    """

    def __init__(
        self, lm: LM, limits: Limits, vectors: Store, conditions: Store, model_id: str
    ) -> None:
        self.lm, self.limits, self.model_id = lm, limits, model_id
        self.vectors, self.conditions = vectors, conditions
        config = lm.model.config
        ctx = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 0)
        self.context = int(ctx or 1 << 30)

    # -- whole requests --------------------------------------------------------------------------
    def completion(self, req: CompletionRequest) -> Rows:
        self._model(req.model)
        if req.echo or req.suffix or (req.best_of or 1) != 1:
            raise APIError(400, "echo, suffix and best_of are not supported", param="echo")
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        if not prompts or len(prompts) > self.limits.max_prompts:
            raise APIError(400, f"give 1 to {self.limits.max_prompts} prompts", param="prompt")
        self._sampling(req, len(prompts) * req.n)
        max_tokens = self._max_tokens(req.max_tokens, 16, "max_tokens")
        ids = [
            self.text_ids(p, max_tokens, f"prompt[{i}]" if len(prompts) > 1 else "prompt")
            for i, p in enumerate(prompts)
        ]
        adds, described = self.steering(req.steering)
        seeds = self._seeds(req.seed, len(prompts) * req.n)
        stop = self._stop(req.stop)
        sampling = self.sampling(req.temperature, req.top_p, req.frequency_penalty)
        rows = [
            Request(
                p,
                adds,
                req.steering_location,
                None,
                max_tokens,
                sampling,
                seeds[k * req.n + j],
                stop,
            )
            for k, p in enumerate(ids)
            for j in range(req.n)
        ]
        return Rows(rows, sum(len(p) for p in ids), described)

    def chat(self, req: ChatRequest) -> Rows:
        self._model(req.model)
        self._sampling(req, req.n)
        if req.response_format and req.response_format.get("type") not in (None, "text"):
            raise APIError(
                400, "only response_format {'type': 'text'} is supported", param="response_format"
            )
        asked = req.max_completion_tokens or req.max_tokens
        param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        max_tokens = self._max_tokens(asked, self.limits.default_chat_max_tokens, param)
        ids, span = self.chat_ids(req.messages, max_tokens, steered=bool(req.steering))
        adds, described = self.steering(req.steering)
        seeds = self._seeds(req.seed, req.n)
        stop = self._stop(req.stop)
        sampling = self.sampling(req.temperature, req.top_p, req.frequency_penalty)
        rows = [
            Request(ids, adds, req.steering_location, span, max_tokens, sampling, seeds[j], stop)
            for j in range(req.n)
        ]
        return Rows(rows, len(ids), described)

    def sweep(self, req: SweepRequest) -> SweepPlan:
        """``n`` rows per (series, coefficient); coefficient 0 is generated once, unsteered."""
        max_tokens = self._max_tokens(req.max_tokens, 24, "max_tokens")
        ids = self.text_ids(req.prompt, max_tokens, "prompt")
        labels = [req.vector] if req.vector is not None else [f"layer {x}" for x in req.layers]
        completions = len(labels) * len(req.coeffs) * req.n
        if completions > self.limits.max_sweep_rows:
            raise APIError(
                400,
                f"{len(labels)} series × {len(req.coeffs)} coefficients × n={req.n} = "
                f"{completions} completions; at most {self.limits.max_sweep_rows}",
                param="coeffs",
            )
        rows: list[Request] = []
        first: dict[tuple[int, int], int] = {}
        unsteered: int | None = None
        sampling = self.sampling(req.temperature, req.top_p, req.frequency_penalty)
        for si in range(len(labels)):
            for ci, c in enumerate(req.coeffs):
                if c == 0 and unsteered is not None:
                    first[si, ci] = unsteered
                    continue
                adds: tuple[Any, ...] = ()
                if c != 0:
                    layer = None if req.vector is not None else req.layers[si]
                    spec = SteeringSpec.model_validate(
                        {
                            "add": req.add,
                            "sub": req.sub,
                            "vector": req.vector,
                            "coeff": c,
                            "site": req.site,
                            "layer": layer,
                        }
                    )
                    adds = (self.steerable(spec, "coeffs"),)
                first[si, ci] = len(rows)
                if c == 0:
                    unsteered = len(rows)
                rows += [
                    Request(ids, adds, req.location, None, max_tokens, sampling, req.seed + j)
                    for j in range(req.n)
                ]
        return SweepPlan(rows, labels, first)

    # -- parts -----------------------------------------------------------------------------------
    def text_ids(self, text: str, max_tokens: int, param: str) -> tuple[int, ...]:
        if not isinstance(text, str) or not text:
            raise APIError(400, "the prompt must be a non-empty string", param=param)
        return self._fits(self.lm.token_ids(text), max_tokens, param)

    def chat_ids(
        self, messages: list[ChatMessage], max_tokens: int, *, steered: bool = True
    ) -> tuple[tuple[int, ...], tuple[int, int] | None]:
        """The model's chat template with the assistant's turn opened, and the span of the
        last user message (where steering lands)."""
        try:
            ct = self.lm.chat_tokens([m.model_dump() for m in messages])
            span = ct.last_user if steered else None
        except ActAddError as e:
            raise APIError(400, str(e), param="messages") from e
        return self._fits(list(ct.ids), max_tokens, "messages"), span

    def steering(self, specs: list[SteeringSpec]) -> tuple[tuple[Any, ...], list[str]]:
        """One steerable per ``steering`` entry, and their descriptions."""
        if len(specs) > self.limits.max_additions:
            raise APIError(
                400,
                f"{len(specs)} steering entries; at most {self.limits.max_additions}",
                param="steering",
                code="too_many_additions",
            )
        adds = tuple(self.steerable(s, f"steering[{i}]") for i, s in enumerate(specs))
        return adds, [a.describe() for a in adds]

    def steerable(self, s: SteeringSpec, param: str) -> Any:
        """An entry as one steerable: an addition, an x-vector pair, or a stored vector,
        wrapped in ``Conditioned`` when it has ``if``."""
        if s.coeff is not None and abs(s.coeff) > self.limits.max_coeff:
            raise APIError(
                400,
                f"coeff {s.coeff} is beyond ±{self.limits.max_coeff}",
                param=f"{param}.coeff",
                code="coeff_out_of_range",
            )
        base = self._unconditional(s, param)
        if s.if_ is None:
            return base
        return Conditioned([base], self.condition(s.if_, f"{param}.if"))

    def condition(self, spec: ConditionSpec, param: str) -> Conditional:
        """A condition expression of stored conditions."""
        if spec.condition is not None:
            found: Conditional = self.conditions.get(spec.condition, f"{param}.condition")
            return found
        if spec.any is not None:
            return AnyOf(
                tuple(self.condition(c, f"{param}.any[{i}]") for i, c in enumerate(spec.any))
            )
        if spec.all is not None:
            return AllOf(
                tuple(self.condition(c, f"{param}.all[{i}]") for i, c in enumerate(spec.all))
            )
        assert spec.not_ is not None  # the schema allows exactly one
        return Not(self.condition(spec.not_, f"{param}.not"))

    def _unconditional(self, s: SteeringSpec, param: str) -> Any:
        if s.vector is not None:
            v = self.vectors.get(s.vector, f"{param}.vector")
            return v if s.coeff is None else v.with_coeff(s.coeff)
        if s.layer is None:  # SteeringSpec requires it; a bare call might not
            raise APIError(400, "layer is required", param=f"{param}.layer")
        try:
            act_name = get_act_name(s.site, s.layer)
            parse_site(act_name, self.lm.n_layers)
        except ActAddError as e:
            raise APIError(400, str(e), param=f"{param}.layer", code="invalid_layer") from e
        for key in ("prompt", "add", "sub"):
            text = getattr(s, key)
            if text is not None:
                self.text_ids(text, 0, f"{param}.{key}")
        coeff = 1.0 if s.coeff is None else s.coeff
        try:
            if s.sub is None:
                return ActivationAddition(coeff, act_name, prompt=s.prompt or s.add)
            kw: dict[str, Any] = {}
            if s.pad:
                kw = {
                    "pad_method": "tokens_right",
                    "model": self.lm,
                    "custom_pad_id": self.lm.to_single_token(" "),
                }
            pair = get_x_vector(s.add or "", s.sub, coeff, act_name, **kw)
            return Group(pair, f"{pair[0].describe()}; {pair[1].describe()}")
        except ActAddError as e:
            raise APIError(400, str(e), param=param) from e

    # -- checks ----------------------------------------------------------------------------------
    def _model(self, model: str | None) -> None:
        if model not in (None, "", self.model_id):
            raise APIError(
                404,
                f"model {model!r} is not served here; this server serves {self.model_id!r} "
                "(GET /v1/models)",
                param="model",
                code="model_not_found",
            )

    def _fits(self, ids: list[int], max_tokens: int, param: str) -> tuple[int, ...]:
        limit = min(self.limits.max_prompt_tokens, self.context - max_tokens)
        if len(ids) > limit:
            raise APIError(
                400,
                f"the prompt has {len(ids)} tokens; this server takes at most {limit} "
                f"(max_prompt_tokens={self.limits.max_prompt_tokens}, context {self.context} "
                f"minus max_tokens {max_tokens})",
                param=param,
                code="context_length_exceeded",
            )
        return tuple(ids)

    def _max_tokens(self, asked: int | None, default: int, param: str) -> int:
        n = default if asked is None else asked
        if n > self.limits.max_tokens:
            raise APIError(
                400,
                f"{param} is {n}; this server allows at most {self.limits.max_tokens}",
                param=param,
                code="max_tokens_too_large",
            )
        return n

    def _sampling(self, req: CompletionRequest | ChatRequest, rows: int) -> None:
        if req.n > self.limits.max_n:
            raise APIError(
                400, f"n is {req.n}; at most {self.limits.max_n}", param="n", code="n_too_large"
            )
        if rows > self.limits.max_rows:
            raise APIError(
                400, f"{rows} completions (prompts × n); at most {self.limits.max_rows}", param="n"
            )
        if req.presence_penalty:
            raise APIError(
                400,
                "presence_penalty is not supported; use frequency_penalty",
                param="presence_penalty",
            )
        if req.logit_bias:
            raise APIError(400, "logit_bias is not supported", param="logit_bias")
        if req.logprobs:
            raise APIError(400, "logprobs are not supported", param="logprobs")

    @staticmethod
    def sampling(temperature: float, top_p: float, frequency_penalty: float) -> Sampling:
        try:
            return Sampling(temperature, top_p, 0, frequency_penalty)
        except ActAddError as e:
            raise APIError(400, str(e), param="temperature") from e

    @staticmethod
    def _seeds(seed: int | None, count: int) -> list[int]:
        """Row ``i`` samples with ``seed + i`` (like ``gen_using_activation_additions``)."""
        base = secrets.randbelow(2**31 - 1) if seed is None else int(seed)
        return [base + i for i in range(count)]

    def _stop(self, stop: str | list[str] | None) -> tuple[str, ...]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > self.limits.max_stop or any(not s for s in stops):
            raise APIError(
                400, f"stop takes up to {self.limits.max_stop} non-empty strings", param="stop"
            )
        return tuple(stops)
