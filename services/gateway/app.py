"""The HTTP face of tuneloop: OpenAI-compatible chat completions, A/B comparisons, feedback,
API keys with tenancy and limits, health; metrics on a port of their own."""


import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Annotated

import grpc
from cachetools import LRUCache
from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import Counter, Histogram

from tuneloop.common.grpc_client import make_aio_channel
from tuneloop.gateway import convert, erasure, workbench
from tuneloop.gateway.auth import ACCESS, ApiKey, KeyStore, authorize, load_keys, retry_after_header
from tuneloop.gateway.errors import ApiError, error_body, from_rpc
from tuneloop.gateway.quotas import Limited, QuotaLimits, Quotas, prompt_cost
from tuneloop.gateway.schemas import ChatCompletionRequest, ComparisonRequest, FeedbackBatch, FeedbackIn
from tuneloop.gateway.settings import GatewaySettings
from tuneloop.v1 import feedback_pb2, feedback_pb2_grpc, generation_pb2, generation_pb2_grpc

log = logging.getLogger(__name__)

REQUESTS = Counter("tuneloop_gateway_requests_total", "HTTP requests.", ["route", "status"])
LATENCY = Histogram(
    "tuneloop_gateway_request_duration_seconds", "HTTP request latency.", ["route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)

async def _client_gone(request: Request) -> None:
    """Returns when the HTTP client disconnects (the body was read already, so the next ASGI
    message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_client_gone(request: Request, *calls: grpc.aio.UnaryUnaryCall) -> list:
    """The calls' responses; a client that disconnects first cancels them, and generation
    stops instead of finishing answers nobody will read."""
    watcher = asyncio.ensure_future(_client_gone(request))
    watcher.add_done_callback(lambda _: [call.cancel() for call in calls])
    try:
        return list(await asyncio.gather(*calls))
    finally:
        # Cancelling the watcher also "cancels" the finished calls: a no-op for them, and
        # the ones still running when another failed stop too.
        watcher.cancel()


class TenancyIndex:
    """Which tenant each completion served through this gateway belongs to (bounded LRU).

    Ids unknown here (served by another replica, or evicted) pass through: the preference
    store checks tenancy durably against the completion log and dead-letters a mismatch.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._ids: LRUCache[str, str] = LRUCache(max(size, 1))

    def add(self, completion_id: str, tenant: str) -> None:
        if self.size == 0:
            return
        self._ids[completion_id] = tenant

    def foreign(self, completion_id: str, tenant: str) -> bool:
        owner = self._ids.get(completion_id)
        return owner is not None and owner != tenant


class BodyLimit:
    """ASGI middleware: 413 for bodies over the limit, whether or not they declare a length."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_big = declared is not None and declared.isdigit() and int(declared) > self.max_bytes
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise _TooLarge()
            return message

        if not too_big:
            try:
                return await self.app(scope, counted, send)
            except _TooLarge:
                pass
        body = json.dumps(error_body(f"request body over {self.max_bytes} bytes", "invalid_request_error")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


def create_app(settings: GatewaySettings) -> FastAPI:
    if settings.api_keys_file is None:
        raise ValueError("api_keys_file (TUNELOOP_GATEWAY_API_KEYS_FILE) is required: the gateway never runs open")
    keys = KeyStore(load_keys(settings.api_keys_file))
    quotas = Quotas(
        QuotaLimits(
            requests_per_minute=settings.rate_limit_per_minute,
            tenant_tokens_per_minute=settings.tenant_tokens_per_minute,
            tenant_max_concurrent=settings.tenant_max_concurrent,
            # A crashed replica's leases outlive the longest request it could have been serving.
            lease_ttl_s=settings.request_timeout_s + 30,
        ),
        settings.limits_storage_url,
    )
    tenancy = TenancyIndex(settings.tenancy_cache_size)
    channels: dict[str, grpc.aio.Channel] = {}

    docs = settings.api_docs
    app = FastAPI(
        title="tuneloop gateway",
        version="1",
        description="OpenAI-compatible chat completions that feed a preference loop.",
        openapi_url="/openapi.json" if docs else None,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
    )
    app.state.settings = settings

    def stub(kind: str):
        # Channels are created lazily inside the server's event loop (grpc.aio needs it).
        if kind not in channels:
            target, service = {
                "generation": (settings.generation_target, "tuneloop.v1.Generation"),
                "candidate": (settings.candidate_generation_target, "tuneloop.v1.Generation"),
                "feedback": (settings.feedback_target, "tuneloop.v1.Feedback"),
            }[kind]
            channels[kind] = make_aio_channel(target, service)
        ch = channels[kind]
        return feedback_pb2_grpc.FeedbackStub(ch) if kind == "feedback" else generation_pb2_grpc.GenerationStub(ch)

    def generation_for(model: str):
        """The Generation service answering for `model`: the candidate's own Deployment when
        one is configured, else the production service (which knows what it serves)."""
        if convert.model_ref(model) == "candidate" and settings.candidate_generation_target:
            return stub("candidate")
        return stub("generation")

    @app.on_event("shutdown")
    async def _close() -> None:
        for ch in channels.values():
            await ch.close()
        await quotas.close()

    @app.middleware("http")
    async def _metrics(request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        LATENCY.labels(path).observe(time.perf_counter() - start)
        REQUESTS.labels(path, str(response.status_code)).inc()
        return response

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(error_body(err.message, err.type, err.param), status_code=err.status, headers=err.headers)

    @app.exception_handler(Limited)
    async def _limited(_: Request, err: Limited) -> JSONResponse:
        return JSONResponse(error_body(str(err), "rate_limit_error", code=f"{err.limit}_limit"), status_code=429,
                            headers={"Retry-After": retry_after_header(err.retry_after_s)})

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first["loc"] if p not in ("body",)]
        param = ".".join(loc) or None
        return JSONResponse(
            error_body(f"{param or 'body'}: {first['msg']}", "invalid_request_error", param), status_code=422
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, err: Exception) -> JSONResponse:
        # Never a stack trace in a response; the log has it.
        log.exception("unhandled error")
        return JSONResponse(error_body("internal error", "server_error"), status_code=500)

    def authed(call: str):
        """The key check for one kind of call (auth.ACCESS), with the key's request rate."""
        if call not in ACCESS:
            raise ValueError(f"no kind of call {call!r} in auth.ACCESS")

        async def check(authorization: Annotated[str | None, Header()] = None) -> ApiKey:
            key = authorize(keys, authorization, call)
            await quotas.admit_request(key.sha256, key.tenant)
            return key

        return check

    def deadline() -> float:
        return settings.request_timeout_s

    async def start_generation(requests: list[generation_pb2.GenerateRequest], tenant: str) -> AsyncExitStack:
        """Charges the tenant's token budget and takes a concurrency slot, held until the
        returned stack closes."""
        cost = sum(prompt_cost(r.prompt.ByteSize(), r.sampling.max_tokens, r.sampling.n) for r in requests)
        await quotas.charge_tokens(tenant, cost)
        slot = AsyncExitStack()
        await slot.enter_async_context(quotas.generation_slot(tenant))
        return slot

    def sampling(body, n: int, logprobs: bool = False):
        s = convert.sampling_of(body, n=n, logprobs=logprobs)
        if not s.HasField("max_tokens"):
            s.max_tokens = settings.default_max_tokens  # what was charged is what may be generated
        return s

    @app.post("/v1/chat/completions", tags=["completions"])
    async def chat_completions(
        request: Request,
        body: ChatCompletionRequest,
        key: Annotated[ApiKey, Depends(authed("complete"))],
        x_tuneloop_conversation_id: Annotated[str | None, Header(max_length=128)] = None,
    ):
        req = generation_pb2.GenerateRequest(
            prompt=convert.prompt_of(body.messages),
            sampling=sampling(body, n=body.n, logprobs=body.logprobs),
            model=convert.model_ref(body.model),
            tenant=key.tenant,
            conversation_id=x_tuneloop_conversation_id or "",
        )
        created = int(time.time())
        gen = generation_for(body.model)
        slot = await start_generation([req], key.tenant)
        if not body.stream:
            async with slot:
                try:
                    [resp] = await unless_client_gone(request, gen.Generate(req, timeout=deadline()))
                except grpc.RpcError as err:
                    raise from_rpc(err) from None
            for c in resp.completions:
                tenancy.add(c.completion_id, key.tenant)
            return convert.chat_completion_json(resp, created)

        call = gen.GenerateStream(req, timeout=deadline())
        try:
            # Wait for the first chunk so a bad request still gets a proper HTTP status.
            first = await call.read()
        except grpc.RpcError as err:
            await slot.aclose()
            raise from_rpc(err) from None

        async def events() -> AsyncIterator[bytes]:
            # The slot is held while the stream runs; the response ending (or the client
            # leaving, which cancels this generator) gives it back.
            async with slot:
                chunk = first
                try:
                    while chunk is not grpc.aio.EOF:
                        tenancy.add(chunk.completion_id, key.tenant)
                        yield f"data: {json.dumps(convert.chunk_json(chunk, created))}\n\n".encode()
                        chunk = await call.read()
                except grpc.RpcError as err:
                    api = from_rpc(err)
                    yield f"data: {json.dumps(error_body(api.message, api.type, api.param))}\n\n".encode()
                except asyncio.CancelledError:
                    call.cancel()
                    raise
                yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/comparisons", tags=["completions"])
    async def comparisons(
        request: Request, body: ComparisonRequest, key: Annotated[ApiKey, Depends(authed("complete"))]
    ):
        """Two candidates for one prompt, with both completion ids, for A/B choices."""
        prompt = convert.prompt_of(body.messages)

        def generate(model: str, n: int) -> generation_pb2.GenerateRequest:
            return generation_pb2.GenerateRequest(
                prompt=prompt, sampling=sampling(body, n=n), model=convert.model_ref(model), tenant=key.tenant,
            )

        wanted = [(body.model, generate(body.model, 2))] if body.model_b is None else [
            (body.model, generate(body.model, 1)), (body.model_b, generate(body.model_b, 1))]
        async with await start_generation([req for _, req in wanted], key.tenant):
            try:
                resps = await unless_client_gone(
                    request, *(generation_for(model).Generate(req, timeout=deadline()) for model, req in wanted))
            except grpc.RpcError as err:
                raise from_rpc(err) from None
        candidates = []
        for resp in resps:
            for c in resp.completions:
                tenancy.add(c.completion_id, key.tenant)
                candidates.append({"completion_id": c.completion_id, "model": convert.model_name(resp.model),
                                   "content": c.text, "finish_reason": convert.FINISH.get(c.finish_reason, "stop")})
        return {"object": "comparison", "created": int(time.time()), "candidates": candidates[:2]}

    async def submit(items: list, key: ApiKey) -> list[dict]:
        for item in items:
            refused = convert.identity_refusal(item, key)
            if refused is not None:
                raise ApiError(403, f"{refused[0]}: {refused[1]}", "permission_error", refused[0])
            for cid in convert.completion_ids_of(item):
                if tenancy.foreign(cid, key.tenant):
                    raise ApiError(403, f"completion {cid} belongs to another tenant", "permission_error",
                                   "completion_id")
        batch = feedback_pb2.SubmitBatchRequest(events=[convert.feedback_event(i, key) for i in items])
        try:
            resp = await stub("feedback").SubmitBatch(batch, timeout=deadline())
        except grpc.RpcError as err:
            raise from_rpc(err) from None
        names = {feedback_pb2.SUBMIT_STATUS_ACCEPTED: "accepted", feedback_pb2.SUBMIT_STATUS_DUPLICATE: "duplicate",
                 feedback_pb2.SUBMIT_STATUS_REJECTED: "rejected"}
        return [
            {"event_id": r.event_id, "status": names.get(r.status, "rejected"),
             "field": convert.PROTO_TO_JSON_FIELD.get(r.field, r.field) or None, "reason": r.reason or None}
            for r in resp.results
        ]

    @app.post("/v1/feedback", tags=["feedback"])
    async def feedback(body: FeedbackIn | FeedbackBatch, key: Annotated[ApiKey, Depends(authed("feedback"))]):
        """One event, or {"events": [...]}. Each is accepted, a duplicate, or rejected with its field."""
        items = body.events if isinstance(body, FeedbackBatch) else [body]
        if len(items) > settings.max_feedback_batch:
            raise ApiError(422, f"at most {settings.max_feedback_batch} events per request", "invalid_request_error",
                           "events")
        results = await submit(items, key)
        if not isinstance(body, FeedbackBatch) and results[0]["status"] == "rejected":
            r = results[0]
            raise ApiError(422, f"{r['field']}: {r['reason']}", "invalid_request_error", r["field"])
        return {"object": "feedback.result", "results": results}

    @app.get("/v1/models", tags=["models"])
    async def models(key: Annotated[ApiKey, Depends(authed("complete"))]):
        kinds = ["generation"] + (["candidate"] if settings.candidate_generation_target else [])
        try:
            resps = [await stub(k).ListModels(generation_pb2.ListModelsRequest(), timeout=10) for k in kinds]
        except grpc.RpcError as err:
            raise from_rpc(err) from None
        return {
            "object": "list",
            "data": [
                {"id": convert.model_name(m.model), "object": "model", "owned_by": "tuneloop",
                 "aliases": list(m.aliases), "engine": m.engine}
                for resp in resps for m in resp.models
            ],
        }

    @app.get("/healthz", tags=["ops"])
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"])
    async def readyz():
        async def check(kind: str) -> bool:
            stub(kind)  # creates the channel on first use
            h = health_pb2_grpc.HealthStub(channels[kind])
            try:
                r = await h.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                return r.status == health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError:
                return False

        ready = {k: await check(k) for k in ("generation", "feedback")}
        return JSONResponse({"ready": all(ready.values()), "backends": ready}, status_code=200 if all(ready.values()) else 503)

    workbench.mount(app, authed, stub, settings)
    erasure.mount(app, authed)

    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    return app


def main(port: int | None = None, metrics_port: int | None = None) -> None:
    import uvicorn

    from tuneloop.common.logs import configure_logging
    from tuneloop.common.settings import load_or_exit

    settings = load_or_exit(GatewaySettings, port=port, metrics_port=metrics_port)
    configure_logging("gateway", settings.log_level)
    try:
        app = create_app(settings)
    except ValueError as err:
        raise SystemExit(f"gateway: {err}") from None
    if settings.metrics_port is not None:
        # Scrapers reach this port, clients only the API one (the chart's NetworkPolicy).
        from prometheus_client import start_http_server

        start_http_server(settings.metrics_port, addr=settings.host)
    uvicorn.run(
        app, host=settings.host, port=settings.port, log_config=None, timeout_graceful_shutdown=settings.grace_seconds
    )
