"""The quart-trio application: the three route groups and the error shapes."""

from __future__ import annotations

import logging
from typing import Any

from quart import request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from kvgrove.actors.api import Runtime
from kvgrove.http import catalog, ollama, openai, openapi, ops
from kvgrove.http.common import BadRequest, NotReady
from kvgrove.http.errors import error_body, is_openai
from kvgrove.http.guard import Gate, Guard

log = logging.getLogger(__name__)


def _error(
    message: str, status: int, param: str | None = None, code: str | None = None
) -> tuple[dict[str, Any], int]:
    body = error_body(
        message, openai=is_openai(request.path), status=status, param=param, code=code
    )
    return body, status


def create_app(runtime: Runtime, gate: Gate | None = None) -> QuartTrio:
    """The app, wrapped in the `Guard` (keys, admission through `gate`, by default one made
    from the settings)."""
    settings = runtime.settings
    app = QuartTrio("kvgrove")
    app.config["KVGROVE_RUNTIME"] = runtime
    app.config["RESPONSE_TIMEOUT"] = None  # streams last as long as generation does
    app.config["BODY_TIMEOUT"] = 60
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    for bp in (ollama.bp, openai.bp, ops.bp, openapi.bp, catalog.bp):
        app.register_blueprint(bp)
    app.asgi_app = Guard(app.asgi_app, settings, gate)  # type: ignore[method-assign]

    @app.errorhandler(BadRequest)
    async def bad_request(e: BadRequest) -> Any:
        return _error(e.message, e.status, e.param, e.code)

    @app.errorhandler(NotReady)
    async def not_ready(e: NotReady) -> Any:
        return _error(str(e), 503)

    @app.errorhandler(RequestEntityTooLarge)
    async def too_large(e: RequestEntityTooLarge) -> Any:
        # The rest of the body is still on its way: close the connection after answering, or
        # the next request on it can hang behind the unread bytes (found by the fuzz tests).
        body, status = _error(f"the request body exceeds {settings.max_body_bytes} bytes", 413)
        return body, status, {"Connection": "close"}

    @app.errorhandler(HTTPException)
    async def http_error(e: HTTPException) -> Any:
        return _error(e.description or e.name, e.code or 500)

    @app.errorhandler(Exception)
    async def internal(e: Exception) -> Any:
        log.exception("unhandled error")
        return _error(f"internal error: {e}", 500)

    return app
