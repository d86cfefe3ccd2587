"""Steering sources: what a tuner or an evaluation suite steers with, at any layer and strength.

A ``Source`` names where the steering comes from, independent of a model:

* ``pair``: an ActAdd prompt pair (``"Love"`` − ``"Hate"``), added at the prompt's front;
* ``mean_diff`` / ``pca``: a vector from a contrast dataset (``actadd.make_vector``), added on
  every token;
* ``optimized``: a vector learned by gradient descent (``actadd.optimize_vector``);
* ``vector``: a stored vector file, at its own sites.

``Source.prepare(lm, layers)`` does the model work once (one pass over the data for every layer)
and returns a ``PreparedSource`` that builds the additions of any (layer, coefficient,
location). The coefficient means what it means for the kind: ActAdd's coefficient for a pair;
for a vector, the norm added per token (directions are rescaled to norm 1 at each site).

Specs are one-line strings for the command line and files: ``pair:Love:Hate``,
``pair+pad: weddings: `` (pad the shorter side with spaces), ``mean_diff:sentiment``,
``pca:sentiment``, ``optimized:sentiment``, ``vector:path.safetensors``.

``Located`` puts any addition at a location of your choice, so rows of one batch can steer at
different locations; ``RandomLike`` is a random direction with the norms of other additions
(the control every steering effect must beat).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from actadd.additions import ActivationAddition, get_x_vector
from actadd.errors import ActAddError, check_finite
from actadd.model import LM
from actadd.positions import check_location
from actadd.provenance import provenance
from actadd.sites import parse_site
from actadd.steering import Injection, Steerable
from actadd.vectors import SteeringVector

__all__ = [
    "KINDS",
    "Located",
    "PreparedSource",
    "RandomLike",
    "Source",
    "additions_of",
    "as_source",
]

log = logging.getLogger(__name__)

KINDS = ("pair", "mean_diff", "pca", "optimized", "vector")
VECTOR_KINDS = ("mean_diff", "pca", "optimized", "vector")
#: default coefficients to search: ActAdd's coefficient for pairs, the added norm for vectors
DEFAULT_COEFFS = {"pair": (1.0, 2.0, 3.0, 5.0, 8.0, 12.0), "vector": (4.0, 8.0, 16.0, 32.0, 64.0)}


@dataclass(frozen=True)
class Located:
    """``inner``'s injections, all landing at ``location`` (``front``, ``mid``, ``back``,
    ``all``) whatever the call's default: a per-row location for mixed batches.

    Example:
        >>> love = Located(ActivationAddition(5, 6, prompt="Love"), "all")
        >>> love.describe()
        "+5 × 'Love' @ blocks.6.hook_resid_pre [all]"
    """

    inner: Any
    location: str

    def __post_init__(self) -> None:
        check_location(self.location)
        if not isinstance(self.inner, Steerable):
            raise ActAddError(f"cannot place {type(self.inner).__name__}: not steerable")

    def injections(self, lm: LM) -> list[Injection]:
        return [replace(i, default_location=self.location) for i in self.inner.injections(lm)]

    def describe(self) -> str:
        inner = getattr(self.inner, "describe", lambda: repr(self.inner))()
        return f"{inner} [{self.location}]"


@dataclass(frozen=True)
class RandomLike:
    """A random direction with, at each site and position, the norm of the net addition of
    ``like`` (which it replaces), landing where ``like`` lands.

    Args:
        like: the additions whose norms (and sites, lengths, locations) to copy.
        seed: which random direction.

    Example:
        >>> control = RandomLike(tuple(get_x_vector("Love", "Hate", 5, 6)), seed=0)
    """

    like: tuple[Any, ...]
    seed: int = 0

    def injections(self, lm: LM) -> list[Injection]:
        by_site: dict[Any, list[Injection]] = {}
        for a in self.like:
            for inj in a.injections(lm):
                by_site.setdefault(inj.site, []).append(inj)
        g = torch.Generator().manual_seed(int(self.seed))
        out = []
        for site, injs in by_site.items():
            n = max(i.tensor.shape[0] for i in injs)
            net = torch.zeros(n, lm.d_model, dtype=torch.float64)  # [L, D]
            for i in injs:
                net[: i.tensor.shape[0]] += i.tensor.detach().double().cpu()
            r = torch.randn(n, lm.d_model, generator=g, dtype=torch.float64)
            r = r / r.norm(dim=-1, keepdim=True) * net.norm(dim=-1, keepdim=True)
            out.append(Injection(site, r.float().to(lm.device), 1.0, injs[0].default_location))
        return out

    def describe(self) -> str:
        return f"random direction #{self.seed} (norms of {len(self.like)} additions)"


@dataclass(frozen=True)
class Source:
    """Where steering comes from (see the module docs); build one with ``Source.parse``.

    Args:
        kind: ``pair``, ``mean_diff``, ``pca``, ``optimized`` or ``vector``.
        add, sub: the pair's prompts (``sub=""``: one addition alone).
        pad: pad the pair's shorter prompt with spaces to the same token length.
        data: the contrast dataset (name or file) for ``mean_diff``/``pca``/``optimized``,
            or the vector file for ``vector``.
        steps: optimiser steps for ``optimized``.

    Example:
        >>> Source.parse("pair:Love:Hate").label
        "'Love' − 'Hate'"
        >>> Source.parse("mean_diff:sentiment").spec
        'mean_diff:sentiment'
    """

    kind: str
    add: str = ""
    sub: str = ""
    pad: bool = False
    data: str = ""
    steps: int = field(default=20)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ActAddError(f"unknown source kind {self.kind!r}: use one of {', '.join(KINDS)}")
        if self.kind == "pair" and not self.add and not (self.pad and self.sub):
            raise ActAddError("a pair source needs the prompt to add, e.g. pair:Love:Hate")
        if self.kind != "pair" and not self.data:
            what = "vector file" if self.kind == "vector" else "contrast dataset"
            raise ActAddError(f"a {self.kind} source needs its {what}, e.g. {self.kind}:NAME")
        if self.steps < 1:
            raise ActAddError(f"steps must be >= 1, got {self.steps}")

    @classmethod
    def parse(cls, spec: str) -> Source:
        """A source from its spec (see the module docs); raises naming the accepted forms."""
        if not isinstance(spec, str) or ":" not in spec:
            raise ActAddError(
                f"cannot read source {spec!r}: use pair:ADD:SUB, pair+pad:ADD:SUB, "
                "mean_diff:DATA, pca:DATA, optimized:DATA or vector:FILE"
            )
        kind, rest = spec.split(":", 1)
        if kind in ("pair", "pair+pad"):
            add, sep, sub = rest.partition(":")
            if not sep:
                raise ActAddError(f"source {spec!r}: a pair is pair:ADD:SUB (SUB may be empty)")
            return cls("pair", add=add, sub=sub, pad=kind == "pair+pad")
        return cls(kind, data=rest)

    @property
    def spec(self) -> str:
        if self.kind == "pair":
            return f"pair{'+pad' if self.pad else ''}:{self.add}:{self.sub}"
        return f"{self.kind}:{self.data}"

    @property
    def label(self) -> str:
        if self.kind == "pair":
            return f"{self.add!r} − {self.sub!r}" if self.sub or self.pad else repr(self.add)
        return f"{self.kind}({self.data})"

    @property
    def default_location(self) -> str:
        return "front" if self.kind == "pair" else "all"

    @property
    def default_coeffs(self) -> tuple[float, ...]:
        return DEFAULT_COEFFS["pair" if self.kind == "pair" else "vector"]

    def prepare(self, lm: LM, layers: Sequence[int]) -> PreparedSource:
        """Do the model work for these layers once (capture, mean difference, optimisation)."""
        return PreparedSource(lm, self, [int(x) for x in layers])


def as_source(obj: Source | str | tuple[str, str] | SteeringVector) -> Source:
    """A ``Source`` from a spec string, an ``(add, sub)`` tuple or a ``Source``."""
    if isinstance(obj, Source):
        return obj
    if isinstance(obj, str):
        return Source.parse(obj)
    if isinstance(obj, tuple) and len(obj) == 2 and all(isinstance(x, str) for x in obj):
        return Source("pair", add=obj[0], sub=obj[1])
    raise ActAddError(
        f"cannot steer with {obj!r}: give a source spec ('pair:Love:Hate', "
        "'mean_diff:sentiment', 'vector:v.safetensors') or an (add, sub) tuple"
    )


class PreparedSource:
    """A ``Source`` made concrete for one model: additions for any layer, coefficient and
    location, the vector file of a choice, and the recipe that rebuilds it."""

    def __init__(self, lm: LM, source: Source, layers: list[int]) -> None:
        self.lm, self.source = lm, source
        self.units: dict[int, SteeringVector] = {}  # layer -> vector of norm 1 per site
        if source.kind == "vector":
            v = SteeringVector.read(source.data, lm)
            self.units[v.layers[0]] = _unit(v)
            self.layers = [v.layers[0]]  # a stored vector stays at its own sites
        else:
            self.layers = sorted({parse_site(layer, lm.n_layers).layer for layer in layers})
            if not self.layers:
                raise ActAddError("no layers to steer at: give e.g. layers=[4, 6, 8]")
        if source.kind in ("mean_diff", "pca"):
            from actadd.contrast import make_vector

            v = make_vector(lm, source.data, self.layers, method=source.kind)
            for name, d in v.directions.items():
                layer = int(name.split(".")[1])
                self.units[layer] = _unit(SteeringVector({name: d}, 1.0, v.meta))
        elif source.kind == "optimized":
            from actadd.optimize import optimize_vector

            for layer in self.layers:
                res = optimize_vector(lm, source.data, layer=layer, steps=source.steps)
                self.units[layer] = _unit(res.vector)

    def additions(self, layer: int, coeff: float, location: str | None = None) -> list[Any]:
        """The steerables of one configuration, landing at ``location`` (default: the kind's)."""
        coeff = check_finite(coeff, "coeff")
        where = location or self.source.default_location
        s = self.source
        if s.kind == "pair":
            adds: list[Any]
            if s.sub == "" and not s.pad:
                adds = [ActivationAddition(coeff, layer, prompt=s.add)]
            elif s.pad:
                space = self.lm.to_single_token(" ")
                adds = list(
                    get_x_vector(s.add, s.sub, coeff, layer, self.lm, "tokens_right", space)
                )
            else:
                adds = list(get_x_vector(s.add, s.sub, coeff, layer))
            return adds if where == "front" else [Located(a, where) for a in adds]
        v = self.units[self._layer(layer)].with_coeff(coeff)
        return [v] if where == "all" else [Located(v, where)]

    def _layer(self, layer: int) -> int:
        if self.source.kind == "vector":
            return self.layers[0]
        if layer not in self.units:
            raise ActAddError(f"layer {layer} was not prepared; have {self.layers}")
        return layer

    def vector(self, layer: int, coeff: float, location: str | None, **meta: Any) -> SteeringVector:
        """The configuration as a ``SteeringVector`` file's content, with ``meta`` and the
        recipe (``meta["recipe"]``) that rebuilds the exact additions (``additions_of``).

        For a pair this is the ActAdd vector averaged over its tokens (what it adds at ``all``):
        a front-placed pair is not one direction, so the recipe is what reproduces it.
        """
        where = location or self.source.default_location
        recipe = {
            "source": self.source.spec,
            "layer": int(layer),
            "coeff": float(coeff),
            "location": where,
        }
        if self.source.kind == "pair":
            v = SteeringVector.from_additions(self.lm, self.additions(layer, coeff, "front"))
            meta_base = dict(v.meta)
            v = SteeringVector(v.directions, 1.0, meta_base)
        else:
            v = self.units[self._layer(layer)].with_coeff(coeff)
            meta_base = dict(v.meta)
        fields = {k: meta_base[k] for k in ("method", "data", "read", "stats") if k in meta_base}
        full = provenance(self.lm, **fields, location=where, recipe=recipe, **meta)
        return SteeringVector(v.directions, v.coeff, full)


def additions_of(lm: LM, vector: SteeringVector) -> list[Any]:
    """The exact additions a tuned vector file stands for (its ``recipe``), or the vector
    itself at its recorded location.

    Example:
        >>> adds = additions_of(lm, SteeringVector.load("chosen.safetensors", lm))
        ... # doctest: +SKIP
    """
    recipe = vector.meta.get("recipe")
    if not isinstance(recipe, dict):
        where = vector.meta.get("location")
        return [vector] if where in (None, "all") else [Located(vector, str(where))]
    source = Source.parse(str(recipe["source"]))
    if source.kind != "pair":  # the file holds the vector itself
        where = str(recipe.get("location", "all"))
        return [vector] if where == "all" else [Located(vector, where)]
    prepared = PreparedSource(lm, source, [int(recipe["layer"])])
    return prepared.additions(int(recipe["layer"]), float(recipe["coeff"]), recipe["location"])


def _unit(v: SteeringVector) -> SteeringVector:
    """``v`` with every direction rescaled to norm 1 and coeff 1 (so coeff = added norm)."""
    dirs = {}
    for name, d in v.directions.items():
        norm = float(d.detach().double().norm())
        if norm == 0:
            raise ActAddError(f"the vector is zero at {name}: nothing to steer with")
        dirs[name] = d / norm
    return SteeringVector(dirs, 1.0, v.meta)
