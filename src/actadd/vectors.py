"""``SteeringVector``: one direction per site, a coefficient and where it came from.

A steering vector is a value: arithmetic, ``with_coeff`` and ``.to()`` return new objects, and
it steers like any addition (``steer``, ``gen_using_activation_additions``, per-row lists,
sweeps) because it resolves into ``Injection`` objects. Each direction is one ``[D]`` tensor,
added as a ``[1, D]`` injection of ``coeff × direction``; with ``addition_location="all"``
(the usual choice for these vectors) it lands on every real token, prompt and generated.

Sites are TransformerLens names (``blocks.6.hook_resid_pre`` is the input of decoder layer 6,
``blocks.6.hook_resid_post`` its output, the same point as ``blocks.7.hook_resid_pre``).

Files: ``save``/``load`` (safetensors with metadata, never pickle) and ``to_gguf``/``from_gguf``
(llama.cpp's control-vector format); see ``actadd.vector_files``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from actadd import vector_files as files
from actadd.errors import ActAddError, VectorFileError, check_finite
from actadd.model import LM
from actadd.provenance import SITE_CONVENTION, now, provenance
from actadd.sites import Site, canonical_act_name, parse_site
from actadd.steering import Injection, as_rows, resolve

__all__ = ["SITE_CONVENTION", "SteeringVector"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class SteeringVector:
    """Directions ``{site name: Tensor[D]}``, a coefficient and provenance metadata.

    Args:
        directions: one 1-D tensor per site, keyed by TransformerLens site names
            (``"blocks.6.hook_resid_pre"``) or int layers (= ``hook_resid_pre``).
        coeff: what every direction is multiplied by when steering; finite.
        meta: provenance (model name, ``lm.fingerprint``, site convention, method, data,
            created, ...): free-form JSON-able values, kept through files.

    Example:
        >>> import torch
        >>> v = SteeringVector({6: torch.ones(4)}, coeff=2.0)
        >>> v.sites, v.layers
        (['blocks.6.hook_resid_pre'], [6])
        >>> (3 * v).coeff, (-v).coeff
        (6.0, -2.0)
        >>> (v + v).directions["blocks.6.hook_resid_pre"].tolist()
        [4.0, 4.0, 4.0, 4.0]
    """

    directions: Mapping[str, Tensor]
    coeff: float = 1.0
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "coeff", check_finite(self.coeff, "coeff"))
        if not isinstance(self.directions, Mapping) or not self.directions:
            raise ActAddError(
                "a SteeringVector needs at least one direction: {site name: tensor[D]}"
            )
        dirs: dict[str, Tensor] = {}
        dim = None
        for key, value in self.directions.items():
            name = canonical_act_name(key)
            t = torch.as_tensor(value)
            if t.ndim == 2 and t.shape[0] == 1:
                t = t[0]
            if t.ndim != 1 or t.numel() == 0:
                raise ActAddError(f"direction for {name} must be 1-D [D], got {tuple(t.shape)}")
            if not t.is_floating_point():
                t = t.float()
            if dim is not None and t.shape[0] != dim:
                raise ActAddError(
                    f"all directions must have one size; {name} has {t.shape[0]}, others {dim}"
                )
            dim = t.shape[0]
            if not torch.isfinite(t.detach()).all():
                raise ActAddError(f"direction for {name} contains NaN or inf values")
            if name in dirs:
                raise ActAddError(f"site {name} is given twice (e.g. as 6 and as its name)")
            dirs[name] = t
        ordered = dict(sorted(dirs.items(), key=lambda kv: Site.from_name(kv[0]).order))
        object.__setattr__(self, "directions", ordered)
        object.__setattr__(self, "meta", dict(self.meta))

    # -- facts -----------------------------------------------------------------------------------
    @property
    def sites(self) -> list[str]:
        """Site names, in forward order."""
        return list(self.directions)

    @property
    def layers(self) -> list[int]:
        """The distinct decoder layers the sites name (as written; negatives are not resolved)."""
        return sorted({int(name.split(".")[1]) for name in self.directions})

    @property
    def d_model(self) -> int:
        return int(next(iter(self.directions.values())).shape[0])

    def norms(self) -> dict[str, float]:
        """Norm of ``coeff × direction`` per site: what is added to each token."""
        c = abs(self.coeff)
        return {k: float(v.detach().float().norm()) * c for k, v in self.directions.items()}

    def describe(self) -> str:
        method = self.meta.get("method", "vector")
        if len(self.sites) <= 3:
            where = ", ".join(self.sites)
        else:
            where = f"{len(self.sites)} sites, layers {self.layers[0]}-{self.layers[-1]}"
        return f"{self.coeff:+g} × {method} @ {where}"

    def __repr__(self) -> str:
        return (
            f"SteeringVector({self.describe()}, d_model={self.d_model}, "
            f"model={self.meta.get('model')!r})"
        )

    # -- steering --------------------------------------------------------------------------------
    def injections(self, lm: LM) -> list[Injection]:
        """One ``[1, D]`` injection of ``coeff × direction`` per site, on the model's device;
        it lands on every token (``all``) unless the caller gives another location."""
        if self.d_model != lm.d_model:
            raise ActAddError(
                f"this vector has d_model={self.d_model} but {lm.name} has {lm.d_model}: it was "
                f"made for another model ({self.meta.get('model', 'unknown')})"
            )
        out = []
        for name, d in self.directions.items():
            site: Site = parse_site(name, lm.n_layers)
            t = d.to(device=lm.device, dtype=torch.promote_types(d.dtype, torch.float32))
            out.append(Injection(site, (self.coeff * t)[None, :], self.coeff, "all"))
        return out

    # -- values ----------------------------------------------------------------------------------
    def with_coeff(self, coeff: float) -> SteeringVector:
        return SteeringVector(self.directions, coeff, self.meta)

    def __mul__(self, k: float) -> SteeringVector:
        return self.with_coeff(self.coeff * check_finite(k, "scale"))

    __rmul__ = __mul__

    def __truediv__(self, k: float) -> SteeringVector:
        k = check_finite(k, "divisor")
        if k == 0:
            raise ActAddError("cannot divide a steering vector by 0")
        return self.with_coeff(self.coeff / k)

    def __neg__(self) -> SteeringVector:
        return self.with_coeff(-self.coeff)

    def __add__(self, other: SteeringVector) -> SteeringVector:
        if not isinstance(other, SteeringVector):
            return NotImplemented
        fa, fb = self.meta.get("fingerprint"), other.meta.get("fingerprint")
        if fa and fb and fa != fb:
            raise ActAddError(
                f"cannot add vectors made for different models ({self.meta.get('model')} and "
                f"{other.meta.get('model')}): their fingerprints differ"
            )
        if self.d_model != other.d_model:
            raise ActAddError(f"cannot add vectors of size {self.d_model} and {other.d_model}")
        dirs: dict[str, Tensor] = {}
        for v in (self, other):
            for name, d in v.directions.items():
                term = v.coeff * d
                dirs[name] = dirs[name] + term.to(dirs[name]) if name in dirs else term
        keep = ("model", "fingerprint", "d_model", "n_layers", "site_convention")
        base = {k: self.meta[k] for k in keep if k in self.meta}
        parts = [_summary(self), _summary(other)]
        meta = {**base, "method": "sum", "parts": parts, "created": now()}
        return SteeringVector(dirs, 1.0, meta)

    def __sub__(self, other: SteeringVector) -> SteeringVector:
        if not isinstance(other, SteeringVector):
            return NotImplemented
        return self + (-other)

    def to(
        self, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> SteeringVector:
        """A copy with every direction moved/cast (``v.to("cuda")``, ``v.to(dtype=...)``)."""
        dirs = {k: v.to(device=device, dtype=dtype) for k, v in self.directions.items()}
        return SteeringVector(dirs, self.coeff, self.meta)

    def allclose(self, other: SteeringVector, *, rtol: float = 1e-5, atol: float = 1e-6) -> bool:
        """Same sites and ``coeff × direction`` equal up to rounding at each."""
        if self.sites != other.sites:
            return False
        pairs = zip(self.directions.values(), other.directions.values(), strict=True)
        return all(
            torch.allclose(
                self.coeff * a.double().cpu(), other.coeff * b.double().cpu(), rtol=rtol, atol=atol
            )
            for a, b in pairs
        )

    @classmethod
    def from_additions(cls, lm: LM, additions: Any, **meta: Any) -> SteeringVector:
        """The vector that ``additions`` (e.g. ``get_x_vector(...)``) add at location ``all``.

        Each addition's activations are averaged over its tokens and scaled by its coeff; the
        result has coeff 1. For one-token prompts such as "Love" − "Hate" this is exactly the
        ActAdd vector.

        Example:
            >>> v = SteeringVector.from_additions(
            ...     lm, get_x_vector("Love", "Hate", 1, 6))  # doctest: +SKIP
        """
        rows, per_row = as_rows(additions)
        if per_row or not rows[0]:
            raise ActAddError("give one list of additions (not one per row, not empty)")
        dirs: dict[str, Tensor] = {}
        for inj in resolve(lm, rows)[0]:
            term = inj.tensor.to(torch.promote_types(inj.tensor.dtype, torch.float32)).mean(0)
            dirs[inj.site.name] = dirs[inj.site.name] + term if inj.site.name in dirs else term
        labels = [a.describe() for a in rows[0] if hasattr(a, "describe")]
        return cls(dirs, 1.0, provenance(lm, method="actadd", data=labels, **meta))

    # -- files (formats in actadd.vector_files) ------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a ``.safetensors`` file: one float32 tensor per site, metadata as JSON."""
        files.save_safetensors(self.directions, self.coeff, self.meta, path)

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], lm: LM | None = None, *, strict: bool = True
    ) -> SteeringVector:
        """Read a file written by ``save``; with ``lm``, check that it fits that model.

        Raises ``VectorFileError`` for a corrupted or foreign file, or (with ``lm``) a model of
        another shape, or another tokenizer (``strict=False`` turns that one into a warning).
        """
        tensors, coeff, meta = files.read_safetensors(path)
        v = cls._from_file(path, tensors, coeff, meta)
        if lm is not None:
            files.check_fits(v.d_model, v.sites, v.meta, lm, source=str(path), strict=strict)
        return v

    @classmethod
    def read(cls, path: str | os.PathLike[str], lm: LM | None = None) -> SteeringVector:
        """Read any vector file actadd knows, told apart by its first bytes: GGUF control
        vectors (``from_gguf``) or actadd's safetensors (``load``)."""
        return cls.from_gguf(path, lm) if files.is_gguf(path) else cls.load(path, lm)

    def to_gguf(self, path: str | os.PathLike[str], *, model_hint: str | None = None) -> None:
        """Write llama.cpp's control-vector GGUF (``direction.N``); see ``actadd.vector_files``."""
        files.save_gguf(self.directions, self.coeff, self.meta, path, model_hint=model_hint)

    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str], lm: LM | None = None) -> SteeringVector:
        """Read a control-vector GGUF (llama.cpp, repeng); ``direction.N`` → resid_post N."""
        tensors, meta = files.read_gguf(path)
        v = cls._from_file(path, tensors, 1.0, meta)
        if lm is not None:
            hint = meta.get("gguf_model_hint")
            model_type = getattr(lm.model.config, "model_type", None)
            if hint and model_type and hint not in (model_type, lm.name):
                log.warning(
                    "%s was made for model type %r, loading into %r", path, hint, model_type
                )
            files.check_fits(v.d_model, v.sites, v.meta, lm, source=str(path), strict=True)
        return v

    @classmethod
    def _from_file(
        cls, path: Any, tensors: dict[str, Tensor], coeff: float, meta: dict[str, Any]
    ) -> SteeringVector:
        try:
            return cls(tensors, coeff, meta)
        except ActAddError as e:  # a file whose values are not a valid vector
            raise VectorFileError(f"{path} is damaged: {e}") from e


def _summary(v: SteeringVector) -> dict[str, Any]:
    return {
        "coeff": v.coeff,
        "method": v.meta.get("method"),
        "sites": v.sites,
        "data": v.meta.get("data"),
    }
