"""The Generation service: serves the policy over gRPC and logs every completion to Kafka.

A request is validated (INVALID_ARGUMENT names the field), its prompt rendered with the
served model's chat template (raw prompts go in unchanged), and handed to the engine. Each
candidate gets an id and, once it is served, a CompletionRecord on the completion log.
When the client goes away or its deadline passes, the generation is aborted. A watcher
follows the registry alias and swaps the served version on promotion or rollback.

A version may be a LoRA adapter (peft's adapter_config.json; see `adapters`): the engine
then serves it on top of its base model, and the base itself answers requests that name
it (its version or one of its aliases), so both are listed by ListModels.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from tuneloop.common.errors import FieldError, abort_invalid
from tuneloop.common.grpc_server import GrpcServer, serving_options
from tuneloop.common.kafka import KafkaSettings
from tuneloop.common.logs import configure_logging
from tuneloop.common.registry import LATEST, VERSION_RE, Registry, RegistryError, RegistrySettings
from tuneloop.common.settings import load_or_exit, load_settings
from tuneloop.generation import metrics
from tuneloop.generation.adapters import with_base
from tuneloop.generation.completion_log import CompletionLog
from tuneloop.generation.engines import create_engine
from tuneloop.generation.engines.base import Delta, Engine, EngineError, EngineRequest, ModelRef, Sampling, Stream
from tuneloop.generation.settings import GenerationSettings
from tuneloop.generation.spool import Spool, SpoolBusyError
from tuneloop.generation.swap import follow
from tuneloop.generation.validation import check_ids, check_prompt, sampling_from, sampling_to_proto
from tuneloop.v1 import completion_pb2, generation_pb2, generation_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
_FINISH = {
    "stop": completion_pb2.FINISH_REASON_STOP,
    "length": completion_pb2.FINISH_REASON_LENGTH,
    "aborted": completion_pb2.FINISH_REASON_ABORTED,
}


@dataclass
class _Candidate:
    """One candidate as the RPC side sees it."""

    index: int
    completion_id: str = field(default_factory=lambda: "cmpl-" + uuid.uuid4().hex)
    parts: list[str] = field(default_factory=list)
    tokens: int = 0
    logprobs: list[completion_pb2.TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    sent: bool = False  # some chunk of it reached the stream
    recorded: bool = False

    def add(self, delta: Delta) -> None:
        self.parts.append(delta.text)
        self.tokens = delta.completion_tokens
        self.logprobs.extend(completion_pb2.TokenLogprob(token=t, logprob=lp) for t, lp in delta.logprobs)
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason

    def to_proto(self) -> completion_pb2.Completion:
        return completion_pb2.Completion(
            completion_id=self.completion_id,
            index=self.index,
            text="".join(self.parts),
            finish_reason=_FINISH.get(self.finish_reason or "aborted", completion_pb2.FINISH_REASON_ABORTED),
            completion_tokens=self.tokens,
            logprobs=self.logprobs,
        )


@dataclass
class _Job:
    request: generation_pb2.GenerateRequest
    request_id: str
    rendered: str
    prompt_tokens: int
    sampling: Sampling
    stream: Stream
    fallback_model: ModelRef
    started: float = field(default_factory=time.monotonic)
    candidates: list[_Candidate] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.candidates = [_Candidate(i) for i in range(self.sampling.n)]

    @property
    def model(self) -> completion_pb2.ModelVersion:
        ref = self.stream.model or self.fallback_model
        return completion_pb2.ModelVersion(name=ref.name, version=ref.version)


class GenerationService(generation_pb2_grpc.GenerationServicer):
    def __init__(
        self,
        engine: Engine,
        completions: CompletionLog,
        settings: GenerationSettings,
        registry: Registry | None = None,
        alias: str | None = None,
        on_engine_dead: Callable[[], None] | None = None,
    ) -> None:
        self._engine = engine
        self._on_engine_dead = on_engine_dead
        self._completions = completions
        self._settings = settings
        self._registry = registry
        self._alias = alias
        # Fast tokenizers reconfigure themselves on every call: one caller at a time.
        self._tokenizer_lock = threading.Lock()

    # ---- RPCs --------------------------------------------------------------------------
    def Generate(
        self, request: generation_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> generation_pb2.GenerateResponse:
        job = self._start(request, context)
        for delta in self._deltas(job, context):
            job.candidates[delta.index].add(delta)
        if not context.is_active():
            return generation_pb2.GenerateResponse()  # cancelled or past its deadline: nothing was served
        for cand in job.candidates:
            self._record(job, cand)
        return generation_pb2.GenerateResponse(
            request_id=job.request_id,
            model=job.model,
            prompt_tokens=job.prompt_tokens,
            completions=[c.to_proto() for c in job.candidates],
        )

    def GenerateStream(
        self, request: generation_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[generation_pb2.GenerateChunk]:
        job = self._start(request, context)
        try:
            for delta in self._deltas(job, context):
                cand = job.candidates[delta.index]
                cand.add(delta)
                if not delta.text and delta.finish_reason is None:
                    continue
                cand.sent = True
                yield generation_pb2.GenerateChunk(
                    request_id=job.request_id,
                    model=job.model,
                    index=cand.index,
                    completion_id=cand.completion_id,
                    delta=delta.text,
                    finish_reason=_FINISH[delta.finish_reason] if delta.finish_reason else 0,
                    completion_tokens=cand.tokens,
                    prompt_tokens=job.prompt_tokens,
                )
                if delta.finish_reason is not None:
                    self._record(job, cand)
        finally:
            # The client may have left mid-stream: stop generating, and record what it saw.
            job.stream.cancel()
            for cand in job.candidates:
                if cand.sent and not cand.recorded:
                    cand.finish_reason = "aborted"
                    self._record(job, cand)

    def ListModels(
        self, request: generation_pb2.ListModelsRequest, context: grpc.ServicerContext
    ) -> generation_pb2.ListModelsResponse:
        ref = self._engine.model
        # The served version first; for an adapter, its base after it (it answers too).
        served = [(ref, ref.adapter), *([(ref.base, False)] if ref.base is not None else [])]
        return generation_pb2.ListModelsResponse(
            models=[
                generation_pb2.ServedModel(
                    model=completion_pb2.ModelVersion(name=m.name, version=m.version),
                    aliases=self._aliases_of(m),
                    engine=self._engine.name,
                    adapter=adapter,
                )
                for m, adapter in served
            ]
        )

    # ---- helpers -----------------------------------------------------------------------
    def _aliases_of(self, ref: ModelRef) -> list[str]:
        if self._registry is None or ref.version == "local":
            return []
        try:
            return sorted(a for a, v in self._registry.aliases(ref.name).items() if v == ref.version)
        except (RegistryError, OSError):
            return []

    def _check_model(self, wanted: str, context: grpc.ServicerContext) -> bool:
        """Aborts NOT_FOUND unless `wanted` is served here; True when it names the base of
        the served adapter rather than the served version."""
        ref = self._engine.model
        # The watched alias always means the served version, also while a swap is under way.
        ok = {"", "production", ref.version, ref.name, f"{ref.name}@{ref.version}"}
        for alias in {*self._aliases_of(ref), *([self._alias] if self._alias else [])}:
            ok |= {alias, f"{ref.name}@{alias}"}
        if wanted in ok:
            return False
        base = ref.base
        if base is not None:
            names = {base.version, f"{base.name}@{base.version}"}
            for alias in self._aliases_of(base):
                names |= {alias, f"{base.name}@{alias}"}
            if wanted in names:
                return True
        served = f"{ref.name}@{ref.version}" + (f" (a LoRA adapter on {base.name}@{base.version})" if base else "")
        context.abort(grpc.StatusCode.NOT_FOUND, f"model: {wanted!r} is not served here; this server serves {served}")

    def _render(self, prompt: completion_pb2.Prompt, context: grpc.ServicerContext) -> tuple[str, list[int]]:
        tok = self._engine.tokenizer
        with self._tokenizer_lock:
            if prompt.WhichOneof("input") == "raw":
                text = prompt.raw
            else:
                if not tok.chat_template:
                    context.abort(
                        grpc.StatusCode.FAILED_PRECONDITION, "the served model has no chat template: send prompt.raw"
                    )
                messages = [{"role": m.role, "content": m.content} for m in prompt.chat.messages]
                text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = list(tok(text, add_special_tokens=False)["input_ids"])
        limit = self._engine.max_model_len
        if len(ids) >= limit:
            abort_invalid(
                context, FieldError("prompt", f"{len(ids)} tokens; the served model takes at most {limit - 1}")
            )
        return text, ids

    def _start(self, request: generation_pb2.GenerateRequest, context: grpc.ServicerContext) -> _Job:
        if not self._completions.accepting:
            metrics.REFUSED.labels(reason="completion_log_full").inc()
            context.abort(
                grpc.StatusCode.UNAVAILABLE,
                "completion log spool is full (Kafka unreachable): answers could not be traced, try later",
            )
        try:
            check_ids(request)
            check_prompt(request.prompt, request.HasField("prompt"))
            sampling = sampling_from(request.sampling, self._settings)
        except FieldError as err:
            abort_invalid(context, err)
        use_base = self._check_model(request.model, context)
        rendered, ids = self._render(request.prompt, context)
        request_id = request.request_id or "req-" + uuid.uuid4().hex
        metrics.PROMPT_TOKENS.inc(len(ids))
        try:
            stream = self._engine.generate(EngineRequest(request_id, ids, sampling, use_base=use_base))
        except EngineError as err:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(err))
        # Fires when the call ends for any reason: after a normal end it changes nothing.
        context.add_callback(stream.cancel)
        return _Job(request, request_id, rendered, len(ids), sampling, stream, self._engine.model)

    def _deltas(self, job: _Job, context: grpc.ServicerContext) -> Iterator[Delta]:
        first = True
        try:
            for delta in job.stream:
                if first:
                    metrics.TIME_TO_FIRST_TOKEN.observe(time.monotonic() - job.started)
                    first = False
                if delta.finish_reason is not None:
                    metrics.COMPLETIONS.labels(finish_reason=delta.finish_reason).inc()
                yield delta
        except EngineError as err:
            log.error("generation failed", extra={"fields": {"request_id": job.request_id, "error": str(err)}})
            if not self._engine.healthy and self._on_engine_dead is not None:
                self._on_engine_dead()
            context.abort(grpc.StatusCode.INTERNAL, f"generation failed: {err}")

    def _record(self, job: _Job, cand: _Candidate) -> None:
        created = Timestamp()
        created.GetCurrentTime()
        request = job.request
        self._completions.publish(
            completion_pb2.CompletionRecord(
                completion_id=cand.completion_id,
                request_id=job.request_id,
                conversation_id=request.conversation_id or job.request_id,
                tenant=request.tenant,
                prompt=request.prompt,
                rendered_prompt=job.rendered,
                completion=cand.to_proto(),
                model=job.model,
                sampling=sampling_to_proto(job.sampling),
                prompt_tokens=job.prompt_tokens,
                created_at=created,
            )
        )
        cand.recorded = True


def resolve_model(ref: str, registry: Registry) -> tuple[ModelRef, str | None]:
    """The version to load (with its base when it is a LoRA adapter) and the alias to follow
    (None for a pinned version or a folder)."""
    folder = Path(ref)
    if folder.is_dir() or "@" not in ref:
        if not folder.is_dir():
            raise RegistryError(f"model {ref!r} is neither a folder nor a registry ref NAME@ALIAS")
        return with_base(ModelRef(folder.resolve().name, "local", folder.resolve()), registry), None
    name, _, tag = ref.partition("@")
    path = registry.resolve(ref)
    alias = None if VERSION_RE.match(tag) or tag == LATEST else tag
    return with_base(ModelRef(name, path.name, path), registry), alias


class GenerationApp:
    """The service and everything it runs: engine, completion log, alias watcher, gRPC server."""

    def __init__(
        self,
        settings: GenerationSettings,
        *,
        kafka: KafkaSettings | None = None,
        registry: Registry | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry or Registry.from_settings(load_settings(RegistrySettings))
        kafka = kafka or load_settings(KafkaSettings)
        first, alias = resolve_model(settings.model, self.registry)
        self.engine = create_engine(settings)
        self.engine.load(first)
        metrics.set_model_info(first.name, first.version, self.engine.name)
        self.completions = CompletionLog(
            kafka,
            Spool(settings.spool_file(), settings.spool_max_bytes, settings.spool_fsync),
            send_timeout_s=settings.publish_timeout_s,
            retry_s=settings.publish_retry_s,
        )
        self.service = GenerationService(
            self.engine, self.completions, settings, self.registry, alias, on_engine_dead=self._engine_dead
        )
        self.watcher = (
            follow(
                self.engine,
                self.registry,
                alias,
                interval_s=settings.alias_poll_s,
                kafka=kafka if settings.alias_events else None,
            )
            if alias
            else None
        )

        def register(server: grpc.Server) -> list[str]:
            generation_pb2_grpc.add_GenerationServicer_to_server(self.service, server)
            return [SERVICE_NAME]

        self.server = GrpcServer("generation", register, **serving_options(settings), on_stop=self._shutdown)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def _engine_dead(self) -> None:
        # Health turns NOT_SERVING so the orchestrator restarts the process.
        log.error("engine is dead; reporting NOT_SERVING")
        self.server.set_serving(False)

    def _start_background(self) -> None:
        """The completion log's publisher and the alias follower, before the first call."""
        self.completions.start()
        if self.watcher is not None:
            self.watcher.start()

    def start(self) -> GenerationApp:
        self._start_background()
        self.server.start()
        return self

    def _shutdown(self) -> None:
        # The gRPC server has drained: nothing produces records any more.
        if self.watcher is not None:
            self.watcher.stop()
        self.completions.close()
        self.engine.close()

    def stop(self, grace: float | None = None) -> None:
        self.server.stop(grace)

    def run_forever(self) -> None:
        self._start_background()
        self.server.run_forever()

    def __enter__(self) -> GenerationApp:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop(grace=1.0)


def main(port: int | None = None, metrics_port: int | None = None, model: str | None = None) -> None:
    """`tuneloop serve generation`: arguments left None come from TUNELOOP_GENERATION_* settings."""
    settings = load_or_exit(GenerationSettings, port=port, metrics_port=metrics_port, model=model)
    kafka = load_or_exit(KafkaSettings)
    registry = Registry.from_settings(load_or_exit(RegistrySettings))
    configure_logging("generation", settings.log_level)
    try:
        app = GenerationApp(settings, kafka=kafka, registry=registry)
    except (RegistryError, EngineError, SpoolBusyError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    app.run_forever()
