"""``actadd serve``: the OpenAI-compatible server with per-request steering, and a playground."""

from __future__ import annotations

import math
from typing import Annotated

import typer

from actadd.cli.common import ModelOpt, console, fail, hint, load


def serve(
    model: ModelOpt = None,
    vectors: Annotated[
        str | None,
        typer.Option(help="directory of .safetensors steering vectors (uploads land here)"),
    ] = None,
    host: Annotated[
        str, typer.Option(help="interface to bind; default this machine only")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(envvar="ACTADD_API_KEY", help="require 'Authorization: Bearer KEY' on /v1"),
    ] = None,
    max_batch: Annotated[
        int | None,
        typer.Option(help="rows decoded together at most (default: the engine's, 32)"),
    ] = None,
    kv_budget: Annotated[
        int | None,
        typer.Option(
            help="KV-cache tokens the running rows may hold (default: 1/4 of free memory)"
        ),
    ] = None,
    max_queue: Annotated[int, typer.Option(help="rows that may wait; beyond: 429")] = 256,
    max_tokens: Annotated[int, typer.Option(help="largest max_tokens a request may ask")] = 512,
    allowed_host: Annotated[
        list[str] | None,
        typer.Option(help="another Host name to accept (repeatable; '*' for any)"),
    ] = None,
    shutdown_timeout: Annotated[
        float, typer.Option(help="seconds in-flight requests get on Ctrl-C/SIGTERM")
    ] = 10.0,
    activation_cache_mb: Annotated[
        int, typer.Option(help="MiB kept of steering prompts' recorded activations")
    ] = 256,
    dtype: Annotated[str | None, typer.Option(help="e.g. float32, bfloat16")] = None,
) -> None:
    """Serve the model over an OpenAI-compatible API with per-request steering, and a playground.

    Needs the serve extra (fastapi, uvicorn).
    """
    import actadd

    try:
        from actadd.serve import Limits, create_app
        from actadd.serve.security import DEFAULT_HOSTS
    except actadd.MissingDependencyError as e:
        raise fail(e) from e
    import uvicorn

    if api_key is not None and not api_key.strip():
        raise fail(actadd.ActAddError("--api-key is empty: give a key, or leave it out"))
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        console.print(
            f"[yellow]warning:[/] listening on {host} without --api-key: anyone who can reach "
            "this port can use the model"
        )
    try:
        lm = load(model, dtype)
        name = "SmolLM2-135M-Instruct" if model is None else None
        web = create_app(
            lm,
            model_id=name,
            vectors_dir=vectors,
            api_key=api_key,
            limits=Limits(max_tokens=max_tokens),
            **({} if max_batch is None else {"max_batch_rows": max_batch}),
            max_queue_rows=max_queue,
            kv_budget_tokens=kv_budget,
            allowed_hosts=[*DEFAULT_HOSTS, *(allowed_host or []), *_bound(host)],
            shutdown_timeout=shutdown_timeout,
            activation_cache_bytes=activation_cache_mb << 20,
        )
    except actadd.ActAddError as e:
        raise fail(e) from e
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/"
    console.print(
        f"serving [bold]{web.state.actadd.model_id}[/] ({lm.n_layers} layers) at {url}  "
        "(OpenAI API under /v1; Ctrl-C stops)",
        markup=True,
        highlight=False,
    )
    uvicorn.run(
        web,
        host=host,
        port=port,
        log_level="info",
        timeout_graceful_shutdown=math.ceil(shutdown_timeout),
    )


def _bound(host: str) -> list[str]:
    """The host the server binds, as clients will name it (not the wildcard addresses)."""
    return [] if host in ("0.0.0.0", "::", "") else [host]


serve.__doc__ = (serve.__doc__ or "").replace("serve extra", f"serve extra: {hint('serve')}")
