"""Scorers behind one small interface, and the catalog that says which one serves a call.

A `Scorer` turns validated pairs into its own input form (`prepare`, in the calling thread,
where a bad item is still the caller's error) and scores a batch of those (`score`, in the
batching thread). `ModelScorer` is a trained reward model; the LLM judge (judge.py) is the
other backend.

`ModelCatalog` follows a registry alias (common `AliasFollower`: polling, plus model events
when Kafka is configured): a newly promoted version is loaded next to the served one and
swapped in by replacing one reference, so a batch already formed finishes on the version
that encoded it and every response names the version that scored it.
"""

from __future__ import annotations

import logging
import threading
from functools import lru_cache
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tuneloop.common import reward_format as rf
from tuneloop.common.alias_follower import AliasFollower
from tuneloop.common.errors import FieldError
from tuneloop.common.kafka import KafkaSettings
from tuneloop.common.registry import VERSION_RE, NotFoundError, Registry, RegistryError
from tuneloop.reward import metrics
from tuneloop.v1 import completion_pb2

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)


class Unavailable(Exception):
    """No scorer can serve the call right now (UNAVAILABLE: worth retrying later)."""


class Scorer(Protocol):
    version: completion_pb2.ModelVersion

    def prepare(self, prompt: rf.Prompt, response: str, field: str) -> Any:
        """The pair in the form `score` takes; FieldError (naming `field`.x) if it cannot be scored."""

    def score(self, prepared: list[Any]) -> list[float]:
        """Scores of prepared pairs, in order."""


class Catalog(Protocol):
    @property
    def ready(self) -> bool:
        """Whether a scorer is loaded and calls can be served."""

    def get(self, ref: str) -> Scorer:
        """The scorer for a request's `model` field ("" = the served one)."""

    def start(self, on_ready: Callable[[], None]) -> None:
        """Loads what can be loaded now; `on_ready` runs whenever a scorer becomes servable."""

    def close(self) -> None: ...


def agreement_with_labels(rows: pd.DataFrame, scorer: Scorer, batch_size: int = 32) -> dict[str, Any]:
    """Pairwise accuracy of any scorer (trained model or judge) on human preference rows."""

    def score(prompts: Sequence[rf.Prompt], responses: Sequence[str]) -> list[float]:
        pairs = zip(prompts, responses, strict=True)
        return scorer.score([scorer.prepare(p, r, f"pairs[{i}]") for i, (p, r) in enumerate(pairs)])

    return rf.pairwise_accuracy(rows, score, batch_size)


def model_label(version: completion_pb2.ModelVersion) -> str:
    return f"{version.name}@{version.version}"


class ModelScorer:
    """A reward model (scalar head) and its tokenizer, scoring through `reward_format`."""

    def __init__(self, folder: Path, version: completion_pb2.ModelVersion, device: str, max_tokens: int) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.version = version
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32)
        rf.prepare_tokenizer(self.tokenizer, model)
        self.model = model.to(device).eval()
        positions = getattr(model.config.get_text_config(), "max_position_embeddings", None) or max_tokens
        self.max_tokens = min(max_tokens, positions)
        # Fast tokenizers are not safe to call from several threads at once.
        self._tokenize = threading.Lock()

    def prepare(self, prompt: rf.Prompt, response: str, field: str) -> list[int]:
        with self._tokenize:
            ids = rf.encode(self.tokenizer, prompt, response)
            if len(ids) <= self.max_tokens:
                return ids
            alone = len(rf.encode(self.tokenizer, prompt, ""))
        if alone > self.max_tokens:
            raise FieldError(f"{field}.prompt", f"{alone} tokens, more than the model's limit {self.max_tokens}")
        raise FieldError(
            f"{field}.response",
            f"prompt and response are {len(ids)} tokens, more than the model's limit {self.max_tokens}",
        )

    def score(self, prepared: list[list[int]]) -> list[float]:
        return rf.score_ids(self.model, prepared, self.tokenizer.pad_token_id, batch_size=len(prepared))


class ModelCatalog:
    """Reward models by reference: the served one (following an alias) plus pinned versions.

    `spec` is NAME@ALIAS (followed), NAME@vNNNN (fixed) or a model folder (fixed).
    Calls may pin another version of the same name ("v0002", "reward@v0002", an alias);
    up to `max_pinned` such versions stay loaded, least recently used evicted first.
    """

    def __init__(
        self,
        spec: str,
        registry: Registry,
        *,
        device: str = "cpu",
        max_tokens: int = 1024,
        max_pinned: int = 2,
        poll_s: float = 2.0,
        kafka: KafkaSettings | None = None,
        group_id: str | None = None,
    ) -> None:
        self.registry = registry
        self.device, self.max_tokens, self.max_pinned = device, max_tokens, max_pinned
        self._on_ready: Callable[[], None] = lambda: None
        self.folder: Path | None = None
        self.name, self.tag = "", ""
        if "@" in spec and "/" not in spec:
            self.name, self.tag = spec.split("@", 1)
        else:
            self.folder = Path(spec)
            if not self.folder.is_dir():
                raise RegistryError(f"reward model {spec!r} is neither NAME@TAG nor a folder")
        self.follows = self.folder is None and not VERSION_RE.match(self.tag)
        self._current: ModelScorer | None = None
        # Pinned versions, least recently used evicted first; loads are serialized by _load_lock.
        self._pinned = lru_cache(maxsize=max_pinned)(self._load_version)
        self._load_lock = threading.Lock()
        self.follower = (
            AliasFollower(registry, self.name, self.tag, None, self._swap_to, interval_s=poll_s, kafka=kafka,
                          group_id=group_id)
            if self.follows
            else None
        )

    # ---- lifecycle ---------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._current is not None

    def start(self, on_ready: Callable[[], None]) -> None:
        """Loads the served model (if one is set yet) and starts following the alias.

        A fixed folder that fails to load fails the start; a registry version that fails
        leaves the server not ready until the alias moves to one that loads.
        """
        self._on_ready = on_ready
        if self.folder is not None:
            self._swap(self._load_folder(self.folder))
        elif self.follower is None:
            try:
                self._swap_to(self.tag)
            except Exception:
                log.exception("reward model failed to load", extra={"fields": {"version": self.tag}})
        else:
            self.follower.check()
            self.follower.start()
        if self._current is None:
            log.warning("no reward model to serve yet", extra={"fields": {"model": f"{self.name}@{self.tag}"}})

    def close(self) -> None:
        if self.follower is not None:
            self.follower.stop()

    def _swap_to(self, version: str) -> None:
        try:
            scorer = self._load_version(version)
        except Exception:  # the follower keeps the old version serving and does not retry this one
            metrics.LOAD_FAILURES.inc()
            raise
        self._swap(scorer)

    def _swap(self, scorer: ModelScorer) -> None:
        old, self._current = self._current, scorer
        metrics.MODEL_INFO.labels("model", model_label(scorer.version)).set(1)
        if old is not None:
            metrics.MODEL_INFO.labels("model", model_label(old.version)).set(0)
            metrics.SWAPS.inc()
        log.info(
            "serving reward model",
            extra={"fields": {"model": model_label(scorer.version), "previous": old and model_label(old.version)}},
        )
        self._on_ready()

    # ---- loading -----------------------------------------------------------------------

    def _load_version(self, version: str) -> ModelScorer:
        folder = self.registry.resolve(f"{self.name}@{version}")
        return ModelScorer(
            folder, completion_pb2.ModelVersion(name=self.name, version=version), self.device, self.max_tokens
        )

    def _load_folder(self, folder: Path) -> ModelScorer:
        try:  # a registered version's folder says which version it is
            card = self.registry.card(folder)
            version = completion_pb2.ModelVersion(name=card.name, version=card.version)
        except NotFoundError:
            version = completion_pb2.ModelVersion(name=folder.name, version="unregistered")
        return ModelScorer(folder, version, self.device, self.max_tokens)

    # ---- serving -----------------------------------------------------------------------

    def get(self, ref: str) -> ModelScorer:
        current = self._current
        if current is None:
            raise Unavailable(f"no reward model to serve yet ({self.name}@{self.tag} is not set)")
        if ref in ("", self.tag, f"{self.name}@{self.tag}", current.version.version, model_label(current.version)):
            return current
        if self.folder is not None:
            raise FieldError("model", f"this server serves the folder {self.folder} only; leave model empty")
        name, _, tag = ref.rpartition("@")
        if name not in ("", self.name):
            raise FieldError("model", f"this server serves {self.name!r} models, not {name!r}")
        try:
            version = self.registry.resolve(f"{self.name}@{tag}").name
        except NotFoundError:
            raise  # a well-formed ref to nothing: NOT_FOUND, not a malformed field
        except RegistryError as err:
            raise FieldError("model", str(err)) from None
        if version == current.version.version:
            return current
        return self._pinned_version(version)

    def _pinned_version(self, version: str) -> ModelScorer:
        if self.max_pinned == 0:
            raise FieldError("model", "this server serves only its current version (max_loaded_models=0)")
        with self._load_lock:
            return self._pinned(version)
