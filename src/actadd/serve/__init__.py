"""``actadd serve``: an OpenAI-compatible HTTP API with per-request steering, and a playground.

The server depends on the steering core one way only: ``schema`` (request bodies), ``requests``
(bodies to engine rows), ``vectors`` (the named vector store), ``engine`` (batching on the
model's thread), ``app`` (FastAPI routes) and ``static`` (the playground). Needs the ``serve``
extra: ``pip install 'actadd[serve]'``.
"""

from actadd.errors import require

require("fastapi", extra="serve", feature="actadd serve")
require("uvicorn", extra="serve", feature="actadd serve")

from actadd.serve.app import create_app, serve  # noqa: E402
from actadd.serve.schema import APIError, Limits  # noqa: E402

__all__ = ["APIError", "Limits", "create_app", "serve"]
