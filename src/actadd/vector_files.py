"""Steering-vector files: safetensors (actadd's own, with metadata) and llama.cpp's GGUF.

**safetensors** (never pickle): one float32 tensor ``[D]`` per site, named by its
TransformerLens site (``blocks.6.hook_resid_pre``); the header's metadata holds
``format=actadd.steering_vector``, ``format_version``, ``coeff`` and ``meta`` (JSON).

**GGUF control vectors** (llama.cpp ``--control-vector``, repeng ``export_gguf``):
architecture ``controlvector``, ``controlvector.model_hint`` (the model type),
``controlvector.layer_count``, and one float32 tensor ``direction.N`` per layer.

Layer numbering, read from llama.cpp's source (``common_control_vector_load_one`` and
``llama_adapter_cvec``): ``direction.N`` is stored at row ``N - 1`` of the control buffer, which
becomes the tensor of layer ``il = N``, added by ``build_cvec(cur, il)`` to the *output* of
decoder layer ``N`` (0-based, the ``l_out`` tensor); ``direction.0`` is rejected ("invalid (zero)
direction tensor layer index"). repeng agrees: its ``direction.N`` is read from
``hidden_states[N + 1]`` and added to the output of ``model.layers[N]``. So

=====================================  ================================
actadd site                            GGUF tensor
=====================================  ================================
``blocks.N.hook_resid_post``           ``direction.N``
``blocks.N.hook_resid_pre`` (N ≥ 1)    ``direction.{N-1}`` (same point)
=====================================  ================================

and import gives ``blocks.N.hook_resid_post``. Export writes ``coeff × direction`` (a file
steers at strength 1 as the vector does); ``attn_out``/``mlp_out`` sites have no GGUF slot.
actadd's metadata rides along as the string ``actadd.meta``, which llama.cpp ignores.

This module reads and writes plain data (directions, coefficient, metadata); the
``SteeringVector`` methods (``save``, ``load``, ``to_gguf``, ``from_gguf``) build values from it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from actadd.errors import ActAddError, CompatibilityWarning, VectorFileError
from actadd.model import LM
from actadd.provenance import now
from actadd.sites import Site, parse_site

__all__ = [
    "check_fits",
    "gguf_layer",
    "is_gguf",
    "read_gguf",
    "read_safetensors",
    "save_gguf",
    "save_safetensors",
]

log = logging.getLogger(__name__)

FORMAT = "actadd.steering_vector"
FORMAT_VERSION = "1"
GGUF_ARCH = "controlvector"
_DIRECTION_RE = re.compile(r"^direction\.(\d+)$")


# -- safetensors ----------------------------------------------------------------------------
def save_safetensors(
    directions: Mapping[str, Tensor],
    coeff: float,
    meta: Mapping[str, Any],
    path: str | os.PathLike[str],
) -> None:
    """Write one float32 tensor per site and the metadata (see the module docs)."""
    from safetensors.torch import save_file

    tensors = {k: d.detach().float().cpu().contiguous() for k, d in directions.items()}
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "coeff": repr(float(coeff)),
        "meta": json.dumps(dict(meta), default=str),
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)


def read_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], float, dict]:
    """``(directions, coeff, meta)`` of a file written by ``save_safetensors``."""
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    if not p.is_file():
        raise VectorFileError(f"no such steering-vector file: {p}")
    try:
        with safe_open(str(p), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        hint = " (it looks like GGUF: use SteeringVector.from_gguf)" if is_gguf(p) else ""
        raise VectorFileError(
            f"{p} is not a readable safetensors file: corrupted or truncated?{hint} ({e})"
        ) from e
    if header.get("format") != FORMAT:
        raise VectorFileError(
            f"{p} is a safetensors file but not an actadd steering vector (its metadata has "
            f"format={header.get('format')!r}, expected {FORMAT!r}); model weights or another "
            "tool's vectors cannot be loaded as one"
        )
    if header.get("format_version") != FORMAT_VERSION:
        raise VectorFileError(
            f"{p} has steering-vector format version {header.get('format_version')!r}; this "
            f"actadd reads version {FORMAT_VERSION}: upgrade actadd"
        )
    try:
        coeff = float(header["coeff"])
        meta = json.loads(header.get("meta", "{}"))
        if not isinstance(meta, dict):
            raise ValueError("meta is not a JSON object")
    except (KeyError, ValueError, TypeError, RecursionError) as e:
        raise VectorFileError(f"{p} is damaged: {e}") from e
    return tensors, coeff, meta


def check_fits(
    d_model: int,
    sites: Sequence[str],
    meta: Mapping[str, Any],
    lm: LM,
    *,
    source: str = "this vector",
    strict: bool = True,
) -> None:
    """Raise ``VectorFileError`` if a vector of width ``d_model`` at ``sites``, with ``meta``,
    was made for a model of another shape or tokenizer."""
    made = meta.get("model", "an unknown model")
    if d_model != lm.d_model:
        raise VectorFileError(
            f"{source} has d_model={d_model} (made for {made}) but {lm.name} has "
            f"d_model={lm.d_model}: steering vectors only fit the model they were made with"
        )
    for name in sites:
        try:
            parse_site(name, lm.n_layers)
        except ActAddError as e:
            raise VectorFileError(
                f"{source} (made for {made}, {meta.get('n_layers', '?')} layers) has site "
                f"{name}, which {lm.name} lacks: {e}"
            ) from e
    fp = meta.get("fingerprint")
    if fp and fp != lm.fingerprint:
        n_layers = meta.get("n_layers")
        why = (
            f"{n_layers} layers vs {lm.n_layers}"
            if n_layers not in (None, lm.n_layers)
            else "another tokenizer or sequence-start (BOS) policy"
        )
        msg = (
            f"{source} was made for {made} (fingerprint {fp}) but {lm.name} has fingerprint "
            f"{lm.fingerprint}: {why}. Rebuild the vector for this model, or pass strict=False "
            "if you know the residual streams match"
        )
        if strict:
            raise VectorFileError(msg)
        log.warning(msg)


def is_gguf(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a GGUF file (by its first four bytes)."""
    p = Path(path)
    if not p.is_file():
        return False
    with p.open("rb") as f:
        return f.read(4) == b"GGUF"


# -- GGUF -------------------------------------------------------------------------------------
def gguf_layer(site: Site) -> int:
    """The ``direction.N`` index of a site (see the module docstring)."""
    if site.kind == "resid_post":
        n = site.layer
    elif site.kind == "resid_pre":
        n = site.layer - 1
    else:
        raise VectorFileError(
            f"{site} has no GGUF control-vector slot: llama.cpp only adds to the residual "
            "stream between layers (use hook_resid_pre or hook_resid_post)"
        )
    if n < 1:
        raise VectorFileError(
            f"{site} is the output of layer 0 or earlier; llama.cpp rejects direction.0 and has "
            "no slot before it: use blocks.N.hook_resid_pre with N >= 2 (or resid_post N >= 1)"
        )
    return n


def save_gguf(
    directions: Mapping[str, Tensor],
    coeff: float,
    meta: Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    model_hint: str | None = None,
) -> None:
    """Write llama.cpp's control-vector GGUF: ``coeff × direction`` per ``direction.N``."""
    import gguf

    n_layers = meta.get("n_layers")
    rows: dict[int, np.ndarray] = {}
    for name, d in directions.items():
        layer = int(name.split(".")[1])
        if layer < 0 and not n_layers:
            raise VectorFileError(f"{name}: negative layers need meta['n_layers'] to export")
        site = parse_site(name, int(n_layers) if n_layers else layer + 1)
        n = gguf_layer(site)
        arr = (coeff * d.detach().double().cpu()).numpy()
        rows[n] = rows[n] + arr if n in rows else arr  # resid_pre N+1 and resid_post N add up
    hint = model_hint or str(meta.get("model_type") or meta.get("model") or "unknown")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), GGUF_ARCH)
    try:
        writer.add_string(f"{GGUF_ARCH}.model_hint", hint)
        writer.add_uint32(f"{GGUF_ARCH}.layer_count", len(rows))
        extra = {**dict(meta), "coeff": coeff, "sites": list(directions)}
        writer.add_string("actadd.meta", json.dumps(extra, default=str))
        for n in sorted(rows):
            writer.add_tensor(f"direction.{n}", rows[n].astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def _field_str(reader: Any, key: str) -> str | None:
    f = reader.get_field(key)
    if f is None:
        return None
    value = f.contents()
    return value if isinstance(value, str) else None


def read_gguf(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(directions, meta)`` of a control-vector GGUF: ``direction.N`` → resid_post N,
    coefficient 1 (the file's values are what llama.cpp adds)."""
    import gguf

    p = Path(path)
    if not p.is_file():
        raise VectorFileError(f"no such GGUF file: {p}")
    try:
        reader = gguf.GGUFReader(str(p))
        arch = _field_str(reader, "general.architecture")
        hint = _field_str(reader, f"{GGUF_ARCH}.model_hint")
        extra = _field_str(reader, "actadd.meta")
        tensors = [(t.name, t.tensor_type, np.array(t.data)) for t in reader.tensors]
    except Exception as e:  # the reader raises ValueError, struct.error, IndexError, ...
        raise VectorFileError(
            f"{p} is not a readable GGUF file: corrupted or truncated? ({e})"
        ) from e
    if arch != GGUF_ARCH:
        raise VectorFileError(
            f"{p} is a GGUF file of architecture {arch!r}, not a control vector "
            f"({GGUF_ARCH!r}): is it a model file?"
        )
    dirs: dict[str, torch.Tensor] = {}
    ignored_by_llama = []
    for name, kind, data in tensors:
        m = _DIRECTION_RE.match(name)
        if m is None:
            raise VectorFileError(f"{p}: tensor {name!r} is not named direction.<layer>")
        if kind not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            raise VectorFileError(f"{p}: {name} has type {kind.name}; llama.cpp needs F32")
        if data.ndim != 1:
            raise VectorFileError(f"{p}: {name} has shape {data.shape}; need one dimension")
        if int(m.group(1)) == 0:
            ignored_by_llama.append(f"{name} (llama.cpp rejects layer 0)")
        elif kind != gguf.GGMLQuantizationType.F32:
            ignored_by_llama.append(f"{name} ({kind.name}: llama.cpp reads only F32)")
        dirs[f"blocks.{int(m.group(1))}.hook_resid_post"] = torch.from_numpy(
            data.astype(np.float32)
        )
    if not dirs:
        raise VectorFileError(f"{p} has no direction tensors")
    if ignored_by_llama:
        # llama.cpp logs an error for such a file and runs unsteered; actadd would steer
        warnings.warn(
            f"{p}: llama.cpp would ignore this file ({', '.join(ignored_by_llama)}) and run "
            "unsteered, while actadd steers with it. For a file both read alike, re-export it "
            "with `actadd vector export FILE --gguf OUT` (F32; a layer-0 direction has no "
            "llama.cpp slot and is refused there)",
            CompatibilityWarning,
            stacklevel=3,
        )
    meta: dict[str, Any] = {}
    if extra:
        try:
            meta = json.loads(extra)
        except json.JSONDecodeError:
            log.warning("%s: ignoring unreadable actadd.meta", p)
    meta.pop("coeff", None)
    meta.pop("sites", None)
    stats = meta.pop("stats", None)
    if isinstance(stats, dict) and meta.get("n_layers"):  # re-key per-site stats to resid_post
        try:
            sites = {k: parse_site(k, int(meta["n_layers"])) for k in stats}
            meta["stats"] = {
                f"blocks.{gguf_layer(s)}.hook_resid_post": stats[k] for k, s in sites.items()
            }
        except ActAddError:
            pass
    meta.setdefault("model_type", hint)
    meta.update({"imported_from": f"gguf:{p.name}", "gguf_model_hint": hint, "loaded": now()})
    return dirs, meta
