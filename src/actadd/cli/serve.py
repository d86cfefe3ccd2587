"""``actadd serve``: the OpenAI-compatible server with per-request steering, and a playground."""

from __future__ import annotations

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
    max_batch: Annotated[int, typer.Option(help="rows per batched generate call")] = 16,
    batch_window_ms: Annotated[float, typer.Option(help="wait for more requests (ms)")] = 20.0,
    max_tokens: Annotated[int, typer.Option(help="largest max_tokens a request may ask")] = 512,
    dtype: Annotated[str | None, typer.Option(help="e.g. float32, bfloat16")] = None,
) -> None:
    """Serve the model over an OpenAI-compatible API with per-request steering, and a playground.

    Needs the serve extra (fastapi, uvicorn).
    """
    import actadd

    try:
        from actadd.serve import Limits, create_app
    except actadd.MissingDependencyError as e:
        raise fail(e) from e
    import uvicorn

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
            max_batch_rows=max_batch,
            batch_window=batch_window_ms / 1000,
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
    uvicorn.run(web, host=host, port=port, log_level="info", timeout_graceful_shutdown=None)


serve.__doc__ = (serve.__doc__ or "").replace("serve extra", f"serve extra: {hint('serve')}")
