"""The HTTP API, shaped as vLLM's pooling API: `/classify`, `/v1/models`, `/v1/load_lora_adapter`,
`/v1/unload_lora_adapter`, plus `/health` and `/metrics`.

Every error is a JSON body `{"error": {"message", "type", "param", "code"}}` (OpenAI's and vLLM's shape) with a
4xx status for what a client can cause; nothing a client sends puts a traceback in the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from lora_cli.serve.metrics import Metrics
from lora_cli.serve.registry import NotFound, Registry
from lora_cli.serve.scheduler import AdapterFailed, QueueFull, Scheduler, gauges
from lora_cli.util.errors import LoraCliError

log = logging.getLogger("lora_cli.serve")
STATUS_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 405: "MethodNotAllowed",
                413: "RequestTooLarge", 422: "UnprocessableEntity", 429: "TooManyRequests", 500: "InternalServerError",
                503: "ServiceUnavailable", 504: "Timeout"}


@dataclass
class Limits:
    """What one request may ask for, and how long it may take."""

    max_texts: int = 256
    max_chars: int = 100_000  # per text
    max_tokens: int = 16_384  # per request, after each text is cut to its adapter's length
    max_body_bytes: int = 8 * 1024 * 1024
    timeout_s: float = 60.0
    retry_after_s: int = 1


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": STATUS_TYPES.get(status, "Error"), "param": None, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


class Server:
    """The app's state and handlers; `app` is the ASGI application."""

    def __init__(self, registry: Registry, make_scheduler: Callable[[Metrics], Scheduler], limits: Limits,
                 api_key: str | None = None) -> None:
        self.registry, self.limits, self.api_key = registry, limits, api_key
        self.scheduler: Scheduler | None = None
        self.metrics = Metrics(gauges(lambda: self.scheduler, registry))
        self._make_scheduler = make_scheduler
        self._registering = asyncio.Lock()
        self.started = int(time.time())
        routes = [
            Route("/classify", self._endpoint("classify", self.classify), methods=["POST"]),
            Route("/v1/classify", self._endpoint("classify", self.classify), methods=["POST"]),
            Route("/v1/models", self._endpoint("models", self.models), methods=["GET"]),
            Route("/v1/load_lora_adapter", self._endpoint("load_lora_adapter", self.load_adapter), methods=["POST"]),
            Route("/v1/unload_lora_adapter", self._endpoint("unload_lora_adapter", self.unload_adapter),
                  methods=["POST"]),
            Route("/health", self._endpoint("health", self.health, auth=False), methods=["GET"]),
            Route("/metrics", self._endpoint("metrics", self.render_metrics), methods=["GET"]),
        ]
        self.app = Starlette(routes=routes, lifespan=self._lifespan,
                             exception_handlers={HTTPException: self._http_error, Exception: self._crash})

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self.scheduler = self._make_scheduler(self.metrics)
        self.scheduler.start()
        try:
            yield
        finally:  # uvicorn has answered the requests in flight by now (the drain on SIGTERM)
            await self.scheduler.stop()

    # ---- plumbing shared by every endpoint
    def _endpoint(self, name: str, fn: Callable[[Request], Awaitable[Response]],
                  auth: bool = True) -> Callable[[Request], Awaitable[Response]]:
        async def handler(request: Request) -> Response:
            try:
                if auth:
                    self._authorize(request)
                response = await fn(request)
            except ApiError as exc:
                response = error_response(exc.status, str(exc), exc.headers)
            except Exception as exc:  # noqa: BLE001 (one line in the log, a JSON body to the client)
                response = await self._crash(request, exc)
            self.metrics.requests[(name, response.status_code)] += 1
            return response

        return handler

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                           {"WWW-Authenticate": "Bearer"})

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        message = {404: f"no endpoint {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return error_response(exc.status_code, message.get(exc.status_code, str(exc.detail)), exc.headers)

    async def _crash(self, request: Request, exc: Exception) -> Response:
        log.error("%s %s failed: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        return error_response(500, f"internal error ({type(exc).__name__}); the server's log has the details")

    async def _json(self, request: Request) -> dict[str, Any]:
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.limits.max_body_bytes:
            raise ApiError(413, f"the request body is {int(length):,} bytes; the limit is {self.limits.max_body_bytes:,}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.limits.max_body_bytes:
                raise ApiError(413, f"the request body is over the limit of {self.limits.max_body_bytes:,} bytes")
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return data

    # ---- endpoints
    async def classify(self, request: Request) -> Response:
        arrived = time.monotonic()
        data = await self._json(request)
        name = data.get("model")
        if name is None and len(self.registry) == 1:
            name = next(iter(self.registry.entries))
        if not isinstance(name, str):
            raise ApiError(422 if name is not None else 400,
                           "'model' must name an adapter (GET /v1/models lists them)")
        texts = self._texts(data.get("input"))
        try:
            entry = self.registry.get(name)
        except NotFound as exc:
            if name == self.registry.base_name:
                raise ApiError(400, f"{name!r} is the base model, which has no classification head: name an adapter "
                                    f"(known: {', '.join(self.registry.entries) or 'none'})") from None
            raise ApiError(404, str(exc)) from None
        tokens = await run_in_threadpool(entry.encode, texts)
        n_tokens = sum(map(len, tokens))
        if n_tokens > self.limits.max_tokens:
            raise ApiError(413, f"the input is {n_tokens:,} tokens; the limit per request is {self.limits.max_tokens:,}")
        assert self.scheduler is not None
        try:
            job = self.scheduler.submit(entry, texts, tokens)
        except QueueFull as exc:
            raise ApiError(429, f"the server is busy: {exc}; retry later",
                           {"Retry-After": str(self.limits.retry_after_s)}) from None
        predictions = await self._wait(request, job.future)
        if predictions is None:  # the client left: nobody reads this
            return Response(status_code=499)
        self.metrics.texts += len(texts)
        self.metrics.tokens += n_tokens
        self.metrics.latency.observe(time.monotonic() - arrived)
        data_out = []
        for i, p in enumerate(predictions):
            item = {"index": i, "label": p.label if p.label is not None else max(p.probabilities, key=p.probabilities.get),
                    "probs": list(p.probabilities.values()), "num_classes": len(p.probabilities)}
            if p.label is None:
                item["labels"] = p.labels
            data_out.append(item)
        return JSONResponse({
            "id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()), "model": name,
            "data": data_out,
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens, "completion_tokens": 0,
                      "prompt_tokens_details": None},
        })

    def _texts(self, value: Any) -> list[str]:
        texts = [value] if isinstance(value, str) else value
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise ApiError(422, "'input' must be a text or a non-empty list of texts")
        if len(texts) > self.limits.max_texts:
            raise ApiError(413, f"{len(texts):,} texts in one request; the limit is {self.limits.max_texts:,}")
        for i, text in enumerate(texts):
            if len(text) > self.limits.max_chars:
                raise ApiError(413, f"text {i} is {len(text):,} characters; the limit is {self.limits.max_chars:,}")
            if not text.strip():
                raise ApiError(422, f"text {i} is empty: there is nothing to classify")
        return texts

    async def _wait(self, request: Request, future: asyncio.Future) -> Any:
        """The job's result, or None if the client disconnected first (its job is then dropped)."""

        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        watch = asyncio.ensure_future(disconnected())
        try:
            done, _ = await asyncio.wait({future, watch}, timeout=self.limits.timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
        if future.done():
            try:
                return future.result()
            except AdapterFailed as exc:
                raise ApiError(500, str(exc)) from None
            except LoraCliError as exc:
                raise ApiError(503, str(exc)) from None
        future.cancel()
        if watch in done:
            return None
        raise ApiError(504, f"the request took longer than the server's limit of {self.limits.timeout_s:g} s")

    async def models(self, request: Request) -> Response:
        base = self.registry.base
        cards = [{"id": self.registry.base_name, "object": "model", "created": self.started, "owned_by": "lora-cli",
                  "root": str(base.path), "parent": None, "max_model_len": base.config.context_length}]
        for entry in list(self.registry.entries.values()):
            cards.append({"id": entry.name, "object": "model", "created": self.started, "owned_by": "lora-cli",
                          "root": str(entry.path), "parent": self.registry.base_name, "max_model_len": entry.max_length,
                          "labels": entry.labels, "num_classes": len(entry.labels),
                          "task": "multi-label" if entry.adapter.multi_label else "classification"})
        return JSONResponse({"object": "list", "data": cards})

    async def load_adapter(self, request: Request) -> Response:
        data = await self._json(request)
        name, path = data.get("lora_name"), data.get("lora_path")
        if not isinstance(name, str) or not isinstance(path, str):
            raise ApiError(400, "send {\"lora_name\": NAME, \"lora_path\": PATH}")
        async with self._registering:
            try:
                resolved = self.registry.client_path(path)
                entry = await run_in_threadpool(self.registry.prepare, name, resolved)
                self.registry.add(entry)
            except LoraCliError as exc:
                raise ApiError(400, str(exc)) from None
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_adapter(self, request: Request) -> Response:
        data = await self._json(request)
        name = data.get("lora_name")
        if not isinstance(name, str):
            raise ApiError(400, "send {\"lora_name\": NAME}")
        try:
            self.registry.unregister(name)
        except NotFound as exc:
            raise ApiError(404, str(exc)) from None
        if self.scheduler is not None:
            await self.scheduler.unload(name)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    async def health(self, request: Request) -> Response:
        return Response(status_code=200)

    async def render_metrics(self, request: Request) -> Response:
        return PlainTextResponse(self.metrics.render(), media_type="text/plain; version=0.0.4")

