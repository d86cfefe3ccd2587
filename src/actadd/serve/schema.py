"""Request bodies of ``actadd serve``: OpenAI's shapes plus ``steering``, and the error shape.

``steering`` is a list; each entry is one of

* ``{"prompt": "Love", "coeff": 5, "layer": 6}``: one ActAdd addition;
* ``{"add": "Love", "sub": "Hate", "coeff": 5, "layer": 6}``: an x-vector pair
  (``"pad": true`` pads the shorter prompt with spaces, ``pad_method="tokens_right"``);
* ``{"vector": "honesty", "coeff": 4}``: a stored ``SteeringVector`` (``GET /v1/vectors``),
  at its own sites, with ``coeff`` replacing its coefficient when given;

and optionally ``"if": {"condition": "legal_advice"}`` (a stored ``Condition``,
``GET /v1/conditions``; or ``{"any": [...]}``, ``{"all": [...]}``, ``{"not": {...}}``): the
entry then steers a choice only if the condition holds for its prompt, and the response says
which entries applied (``steering_applied``, one list per choice).

with an optional ``"site"`` (``resid_pre``, ``resid_post``, ``attn_out``, ``mlp_out``). All
entries of a request share ``steering_location`` (``front``, ``mid``, ``back`` or ``all``); when
it is not given each entry lands at its own default (``front`` for prompt additions, ``all`` for
stored vectors), as in the Python API.

Names follow the Python API (``actadd.positions.LOCATIONS``, ``actadd.sites.KINDS``,
``actadd.metrics.METRICS``) except where OpenAI's request shape fixes them: the location is
``steering_location`` (Python: ``addition_location``) and the penalty ``frequency_penalty``
(Python: ``freq_penalty``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from actadd.metrics import METRICS
from actadd.positions import LOCATIONS
from actadd.sites import KINDS

__all__ = [
    "APIError",
    "ChatMessage",
    "ChatRequest",
    "CompletionRequest",
    "ConditionSpec",
    "Limits",
    "SteeringSpec",
    "SweepRequest",
    "validation_error",
]

# the core's names, not copies: a location or site added there is accepted here
SiteKind = Literal[KINDS]  # type: ignore[valid-type]
Location = Literal[LOCATIONS]  # type: ignore[valid-type]
MetricName = Literal[tuple(METRICS)]  # type: ignore[valid-type]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
MAX_SEED = 2**63 - 2**20  # row i samples with seed + i: room for every row of a request


def _encodable(text: str) -> str:
    # JSON may carry lone UTF-16 surrogates ("\ud800"); no tokenizer can encode them
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"contains a character that is not valid Unicode (a lone surrogate at {e.start})"
        ) from e
    return text


Text = Annotated[str, AfterValidator(_encodable)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]


class APIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.headers = headers
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type,
            param,
            code,
        )

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; beyond it the server answers 4xx and keeps serving."""

    max_prompt_tokens: int = 1024
    max_tokens: int = 512
    default_chat_max_tokens: int = 128
    max_n: int = 8
    max_prompts: int = 8  # prompts in one /v1/completions request
    max_rows: int = 16  # prompts × n
    max_additions: int = 8
    max_coeff: float = 1000.0
    max_stop: int = 4
    max_body_bytes: int = 1 << 20  # JSON bodies
    max_vector_bytes: int = 64 << 20  # PUT /v1/vectors/{name} and /v1/conditions/{name}
    max_vectors: int = 64  # stored vectors, and stored conditions
    max_meta_bytes: int = 64 << 10  # a stored file's metadata (JSON)
    max_sweep_rows: int = 96  # layers × coeffs × n
    body_timeout: float = 10.0  # seconds to send a whole request body


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ConditionSpec(_Strict):
    """When a steering entry applies: a stored condition by name, or ``any``/``all`` of
    several, or ``not`` one (nested at most four deep)."""

    condition: str | None = None
    any: list[ConditionSpec] | None = Field(None, min_length=1, max_length=8)
    all: list[ConditionSpec] | None = Field(None, min_length=1, max_length=8)
    not_: ConditionSpec | None = Field(None, alias="not")

    @model_validator(mode="after")
    def _one(self) -> ConditionSpec:
        given = [x is not None for x in (self.condition, self.any, self.all, self.not_)]
        if sum(given) != 1:
            raise ValueError('give exactly one of "condition", "any", "all" or "not"')
        if self.depth() > 4:
            raise ValueError("conditions nest at most four deep")
        return self

    def depth(self) -> int:
        kids = [*(self.any or []), *(self.all or []), *([self.not_] if self.not_ else [])]
        return 1 + max((k.depth() for k in kids), default=0)


class SteeringSpec(_Strict):
    """One entry of ``steering`` (see the module docs)."""

    prompt: Text | None = None
    add: Text | None = None
    sub: Text | None = None
    vector: str | None = None
    coeff: float | None = Field(None, allow_inf_nan=False)
    layer: int | None = None
    site: SiteKind = "resid_pre"
    pad: bool = False
    if_: ConditionSpec | None = Field(None, alias="if")

    @model_validator(mode="after")
    def _one_kind(self) -> SteeringSpec:
        kinds = [self.prompt is not None, self.add is not None, self.vector is not None]
        if sum(kinds) != 1:
            raise ValueError(
                'give exactly one of "prompt", "add" (with optional "sub") or "vector"'
            )
        if self.sub is not None and self.add is None:
            raise ValueError('"sub" needs "add" (an x-vector is add − sub)')
        if self.vector is None and self.layer is None:
            raise ValueError('"layer" is required for prompt additions, e.g. "layer": 6')
        if self.vector is not None and (self.layer is not None or self.pad):
            raise ValueError('a "vector" entry steers at its own sites: drop "layer"/"pad"')
        return self


class _Sampling(_Strict):
    model: str | None = None
    temperature: float = Field(1.0, ge=0, le=2, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    presence_penalty: float = Field(0.0, allow_inf_nan=False)
    seed: Seed | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: Text | list[Text] | None = None
    user: Text | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None
    steering: list[SteeringSpec] = Field(default_factory=list)
    steering_location: Location | None = None


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: OpenAI's legacy completions, plus ``steering``."""

    prompt: Text | list[Text]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[dict[str, Any]]
    name: Text | None = None


class ChatRequest(_Sampling):
    """``POST /v1/chat/completions``: OpenAI's chat completions, plus ``steering``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None


class SweepRequest(_Strict):
    """``POST /v1/actadd/sweep``: a metric of steered completions over coefficients × layers.

    Each point samples ``n`` completions with seeds ``seed .. seed+n-1`` (the same seeds at
    every point, so points differ only by the steering); coefficient 0 is the unsteered model.
    """

    prompt: Text
    add: Text | None = None
    sub: Text | None = None
    vector: str | None = None
    layers: list[int] = Field(default_factory=lambda: [6], min_length=1, max_length=8)
    coeffs: list[FiniteFloat] = Field(min_length=1, max_length=21)
    site: SiteKind = "resid_pre"
    location: Location | None = None
    metric: MetricName = "sentiment"  # type: ignore[valid-type]
    words: list[Text] | None = None
    n: int = Field(2, ge=1, le=16)
    max_tokens: int = Field(24, ge=1)
    temperature: float = Field(1.0, ge=0, le=2, allow_inf_nan=False)
    top_p: float = Field(0.3, gt=0, le=1, allow_inf_nan=False)
    frequency_penalty: float = Field(1.0, ge=-2, le=2, allow_inf_nan=False)
    seed: Seed = 0

    @model_validator(mode="after")
    def _what(self) -> SweepRequest:
        if (self.add is None) == (self.vector is None):
            raise ValueError('give "add" (with optional "sub") or "vector"')
        if METRICS[self.metric].needs == "words" and not self.words:
            raise ValueError(f'metric "{self.metric}" needs "words", e.g. ["love", "loving"]')
        if METRICS[self.metric].needs == "target":
            raise ValueError(f'metric "{self.metric}" is not available in the playground sweep')
        return self


def error_param(loc: tuple[Any, ...]) -> str | None:
    """``("body", "steering", 0, "coeff")`` → ``"steering[0].coeff"`` (OpenAI's ``param``)."""
    out = ""
    for part in loc[1:] if loc and loc[0] in ("body", "query", "path") else loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def validation_error(errors: list[Any]) -> APIError:
    """A 400 ``APIError`` for pydantic's errors: the first three, and the first one's field."""
    first = errors[0] if errors else {"msg": "invalid request", "loc": (), "type": "invalid"}
    if first.get("type") == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {first.get('msg')}", code="json_invalid")
    msgs = []
    for e in errors[:3]:
        where = error_param(tuple(e.get("loc", ())))
        msg = str(e.get("msg", "")).removeprefix("Value error, ")
        msgs.append(f"{where}: {msg}" if where else msg)
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return APIError(
        400,
        "; ".join(msgs) + more,
        param=error_param(tuple(first.get("loc", ()))),
        code=str(first.get("type")),
    )
