"""The ASGI app of the feature server: routes, bearer-token check, error statuses, metrics.

    GET  /healthz                 200 once every view is open and caught up, else 503 (no token)
    GET  /metrics                 Prometheus text
    GET  /v1/views                views, features, types, windows, versions, freshness
    POST /v1/views/{view}         {"keys": [...], "at": ...} -> {"rows": [{...}, ...]}
    POST /v1/services/{service}   {"rows": [{...}, ...], "at": ...} -> {"rows": [{...}, ...]}

A bare ASGI callable, no framework: a read costs tens of microseconds, so routing and JSON are a
visible share of a request (see README, "HTTP feature server"). Reads run on the event loop
thread: they are short, never wait on a lock the writer holds, and a thread hop would cost more
than the read. A name from the URL (percent-decoded by the server) is looked up among the
store's views; the client checks it again and never joins it into a path unchecked.
"""

from __future__ import annotations

import gc
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any, cast

import orjson

from flows.serving.catalog import CATALOG_TTL_S, health_report, view_catalog
from flows.serving.config import ServeConfig
from flows.serving.errors import (
    MethodNotAllowedError,
    NotFoundError,
    PayloadTooLargeError,
    ServingError,
    UnauthorizedError,
)
from flows.serving.metrics import ServingMetrics
from flows.serving.requests import parse_service_read, parse_view_read
from state.client import FeatureClient
from state.errors import (
    InexactReadError,
    KeyTypeError,
    ServiceRequestError,
    StateError,
    UnknownServiceError,
    UnknownViewError,
)
from state.kernels import warm_up
from state.servedlog import ServedLog

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

log = logging.getLogger(__name__)
_JSON = b"application/json"
_OPTIONS = orjson.OPT_SERIALIZE_NUMPY
_FIXED = {
    ("GET", "/healthz"): "healthz",
    ("GET", "/metrics"): "metrics",
    ("GET", "/v1/views"): "views",
}
_PREFIXES = (("/v1/views/", "view"), ("/v1/services/", "service"))
_NOT_FOUND = (UnknownViewError, UnknownServiceError)
_BAD_INPUT = (KeyTypeError, ServiceRequestError, InexactReadError)
_MAX_MESSAGE = 800  # characters of an error message; the middle of a longer one is cut


class _ClientGoneError(Exception):
    """The client disconnected before its request body arrived."""


@dataclass(frozen=True, slots=True)
class Route:
    """Which endpoint a request is for; `name` is the view or service from the URL."""

    endpoint: str
    name: str = ""


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes
    content_type: bytes = _JSON


class FeatureServer:
    """The ASGI app over one FeatureClient (one per worker process).

    Args:
        config: the server's settings.
        client: the read client; by default one over `config.state`.
    """

    def __init__(self, config: ServeConfig, client: FeatureClient | None = None) -> None:
        self.config = config
        self.client = client if client is not None else _open_client(config)
        self.metrics = ServingMetrics()
        self._token = config.token()
        self._views = frozenset(self.client.views())
        self._catalog: tuple[float, bytes] = (-CATALOG_TTL_S, b"")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        route, kind = Route("unknown"), None
        try:
            self._authorize(scope)  # before routing: without the token nothing is revealed
            route = _route(scope["method"], scope["path"])
            reply = await self._answer(route, scope, receive)
        except _ClientGoneError:
            return  # nobody to answer
        except Exception as exc:  # every failure is an answer, never a dropped connection
            kind, reply = _failure(exc)
        await _send(send, reply)
        name = route.name if reply.status == 200 or route.name in self._views else ""
        self.metrics.answered(
            route.endpoint, name, reply.status, time.perf_counter() - started, kind
        )

    def _authorize(self, scope: Scope) -> None:
        if self._token is None or scope["path"] == "/healthz":
            return
        given = dict(scope["headers"]).get(b"authorization", b"")
        if not hmac.compare_digest(given, b"Bearer " + self._token):
            what = "is missing" if not given else "is wrong"
            raise UnauthorizedError(
                f"the bearer token {what}; send the header 'Authorization: Bearer <token>' with "
                "the token of the server's --token-file"
            )

    async def _answer(self, route: Route, scope: Scope, receive: Receive) -> Reply:
        if route.endpoint == "view":
            self._check_view(route.name)
            read = parse_view_read(await self._body(scope, receive), self.config.batch_limit)
            keys = cast("list[str | int]", read.keys)  # the client takes tuples for composite keys
            return _json({"rows": self.client.get_many(route.name, keys, read.at)})
        if route.endpoint == "service":
            rows = parse_service_read(await self._body(scope, receive), self.config.batch_limit)
            if len(rows.rows) == 1:  # one request: the client's one-row path
                values = [self.client.get_service(route.name, rows.rows[0], rows.at)]
            else:
                values = self.client.get_service_many(route.name, rows.rows, rows.at)
            return _json({"rows": values})
        return self._describe(route.endpoint)

    def _describe(self, endpoint: str) -> Reply:
        if endpoint == "healthz":
            ready, details = health_report(self.client)
            return Reply(200 if ready else 503, orjson.dumps(details))
        if endpoint == "metrics":
            return Reply(200, self.metrics.exposition(), b"text/plain; version=0.0.4")
        return Reply(200, self._catalog_body())

    def _catalog_body(self) -> bytes:
        made, body = self._catalog
        if time.monotonic() - made >= CATALOG_TTL_S:
            body = orjson.dumps(view_catalog(self.client))
            self._catalog = (time.monotonic(), body)
        return body

    def _check_view(self, name: str) -> None:
        """404 for a name that is not one of the store's views (the listing is re-read on a
        miss, so a view created after start is found)."""
        if name in self._views:
            return
        self._views = frozenset(self.client.views())
        if name not in self._views:
            shown = repr(name) if len(name) <= 100 else f"{name[:80]!r}... ({len(name)} chars)"
            known = ", ".join(sorted(self._views)) or "(none yet)"
            raise NotFoundError(f"unknown view {shown}; views: {known}")

    async def _body(self, scope: Scope, receive: Receive) -> bytes:
        limit = self.config.max_body_bytes
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGoneError
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLargeError(
                    f"the request body is larger than {limit} bytes (the body limit follows "
                    "the server's --batch-limit); split the request"
                )
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                for name in self.client.views():  # open every view before the first request
                    self.client.layout(name)
                # What startup made (modules, the client, its layouts) lives as long as the
                # worker: out of the collector's generations, a full collection, which took
                # ~50 ms over them and stalls every request in flight, costs next to nothing.
                gc.collect()
                gc.freeze()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.client.close()
                await send({"type": "lifespan.shutdown.complete"})
                return


def create_app() -> FeatureServer:
    """The app of one worker process, from the ServeConfig that `flows.serve` put in the
    environment (the factory the HTTP server calls in each worker)."""
    return FeatureServer(ServeConfig.from_env())


def _open_client(config: ServeConfig) -> FeatureClient:
    log = None
    if config.served_log:
        log = ServedLog(config.served_log, rate=config.served_log_rate)
    warm_up()  # the batch read's compiled kernel, before the first request needs it
    return FeatureClient(
        config.state, refresh_s=config.refresh_s, features=config.features, served_log=log
    )


def _route(method: str, path: str) -> Route:
    endpoint = _FIXED.get((method, path))
    if endpoint is not None:
        return Route(endpoint)
    for prefix, kind in _PREFIXES:
        if path.startswith(prefix):
            if method != "POST":
                raise MethodNotAllowedError(f"{method} {prefix}{{name}}: use POST")
            return Route(kind, path[len(prefix) :])
    if any(path == p for _, p in _FIXED):
        raise MethodNotAllowedError(f"{method} {path}: use GET")
    shown = path if len(path) <= 100 else path[:80] + "..."
    raise NotFoundError(
        f"no endpoint {method} {shown!r}; endpoints: POST /v1/views/{{view}}, "
        "POST /v1/services/{service}, GET /v1/views, GET /healthz, GET /metrics"
    )


def _failure(exc: Exception) -> tuple[str, Reply]:
    if isinstance(exc, ServingError):
        return exc.kind, _error(exc.status, str(exc))
    if isinstance(exc, _NOT_FOUND):
        return "not_found", _error(404, str(exc))
    if isinstance(exc, _BAD_INPUT):
        return "bad_request", _error(400, str(exc))
    if isinstance(exc, StateError):
        return "state", _error(500, str(exc))
    log.exception("feature server: unexpected failure answering a request")
    return "internal", _error(500, f"internal error ({type(exc).__name__}: {exc})")


def _error(status: int, message: str) -> Reply:
    if len(message) > _MAX_MESSAGE:  # e.g. a 10k-character name echoed by the client
        cut = len(message) - 500
        message = f"{message[:200]}...({cut} characters cut)...{message[-300:]}"
    return Reply(status, orjson.dumps({"error": message, "status": status}))


def _json(value: Any) -> Reply:
    return Reply(200, orjson.dumps(value, option=_OPTIONS))


async def _send(send: Send, reply: Reply) -> None:
    headers = [(b"content-type", reply.content_type), (b"content-length", b"%d" % len(reply.body))]
    if reply.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": reply.body})
