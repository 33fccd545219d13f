"""Model registry: versioned model folders under one root (a PVC in the cluster).

Layout under the root:

    .staging/<token>/                 registrations in progress (never listed)
    <name>/versions/v0001/            committed versions: model files + card.json
    <name>/aliases/production.json    alias -> version, with its history
    <name>/audit/<time>-<id>.json     who moved an alias from the workbench, and why
    <name>/.lock                      serialises version allocation and alias moves

A version becomes visible only through one rename of a fully written, fsynced staging
folder, so a crash mid-registration leaves nothing resolvable; `cleanup_staging` removes
the leftovers. Aliases are small JSON files replaced atomically (write, fsync, rename,
fsync the folder), so readers see the old or the new target, never a torn file.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import typer
from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from tuneloop.common.durable import file_sha256, write_atomic
from tuneloop.common.durable import fsync_dir as _fsync_dir

log = logging.getLogger(__name__)

Kind = Literal["policy", "reward"]
EventType = Literal["registered", "promoted", "rolled_back"]
# (event_type, name, version, alias, previous_version); alias is None for "registered",
# whose previous_version is the parent version of the same name, if any.
EventListener = Callable[[EventType, str, str, str | None, str | None], None]

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
VERSION_RE = re.compile(r"^v(\d{4,})$")
LATEST = "latest"  # pseudo-alias: the highest version of a name
CARD_FILE = "card.json"
STAGING = ".staging"
_HISTORY_KEEP = 100
_CHUNK = 1 << 20


class RegistryError(Exception):
    """A registry operation cannot be done; the message says why and what was expected."""


class InvalidRefError(RegistryError, ValueError):
    """A model reference is malformed."""


class NotFoundError(RegistryError, LookupError):
    """A model name, version or alias does not exist."""


class RegistrySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TUNELOOP_REGISTRY_")

    root: Path = Field(
        Path(".tuneloop/registry"),
        description="Folder holding every model version and alias (a shared volume in the cluster).",
    )
    stale_staging_s: float = Field(
        3600.0,
        gt=0,
        description="Age after which an unfinished registration of another host is deleted.",
    )


class FileEntry(BaseModel):
    sha256: str = Field(description="Hex SHA-256 of the file's bytes.")
    size: int = Field(description="Size in bytes.")


class ModelCard(BaseModel):
    """What a version is and where it came from; stored as card.json in the version."""

    name: str = Field(description="Model name, e.g. 'policy'.")
    version: str = Field(description="Version id, monotonic per name: v0001, v0002, ...")
    kind: Kind = Field(description="'policy' (causal LM) or 'reward' (scalar scorer).")
    parent: str | None = Field(None, description="Concrete ref of the version this one was trained from.")
    dataset_snapshot: dict[str, dict[int, int]] = Field(
        default_factory=dict, description="Kafka topic -> partition -> offset the training data ends at."
    )
    training_config: dict[str, Any] = Field(default_factory=dict, description="Stage configuration used.")
    metrics: dict[str, Any] = Field(default_factory=dict, description="Evaluation results of this version.")
    code_version: str = Field(description="git describe of the code that made it, else the package version.")
    created_at: datetime = Field(description="When the version was committed (UTC).")
    description: str = Field("", description="Free text, e.g. where an imported model came from.")
    files: dict[str, FileEntry] = Field(default_factory=dict, description="Relative path -> checksum and size.")

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


def code_version() -> str:
    """`git describe` of the source tree when run from a checkout, else the package version."""
    try:
        out = subprocess.run(
            ["git", "-C", str(Path(__file__).parent), "describe", "--tags", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tuneloop")
    except PackageNotFoundError:
        return "unknown"


def _check_name(name: str, what: str = "model name") -> str:
    if not NAME_RE.match(name):
        raise InvalidRefError(f"invalid {what} {name!r}: use lowercase letters, digits, '.', '_' or '-'")
    return name


def _check_alias(alias: str) -> str:
    _check_name(alias, "alias")
    if VERSION_RE.match(alias) or alias == LATEST:
        raise InvalidRefError(f"{alias!r} is reserved and cannot be used as an alias")
    return alias


def _copy_file(src: Path, dst: Path) -> FileEntry:
    digest = hashlib.sha256()
    size = 0
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        while chunk := fin.read(_CHUNK):
            digest.update(chunk)
            fout.write(chunk)
            size += len(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    return FileEntry(sha256=digest.hexdigest(), size=size)


def _sync_file(path: Path) -> FileEntry:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    return FileEntry(sha256=file_sha256(path), size=path.stat().st_size)


def _stage_tree(src: Path, dst: Path) -> dict[str, FileEntry]:
    """Fills `dst` from `src` (or, if they are the same folder, syncs it in place) with every
    file fsynced; returns the manifest."""
    in_place = src == dst
    if not in_place:
        dst.mkdir()
    files: dict[str, FileEntry] = {}
    dirs = [dst]
    for path in sorted(src.rglob("*")):  # sorted: a folder comes before its contents
        rel = path.relative_to(src)
        if rel.as_posix() == CARD_FILE:
            continue  # the registry writes its own card
        target = dst / rel
        if path.is_dir():
            if not in_place:
                target.mkdir()
            dirs.append(target)
        elif path.is_file():
            files[rel.as_posix()] = _sync_file(target) if in_place else _copy_file(path, target)
        else:
            raise RegistryError(f"cannot register {path}: not a regular file or folder")
    for folder in reversed(dirs):
        _fsync_dir(folder)
    return files


# Staging folders this process is writing; a same-host, same-pid folder not in here is a
# leftover of an earlier process that had our pid (e.g. a restarted container's pid 1).
_ACTIVE: set[str] = set()
_ACTIVE_LOCK = threading.Lock()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Registry:
    """Versions and aliases of named models under `root`; safe across threads and processes."""

    def __init__(
        self,
        root: Path | str,
        *,
        on_event: EventListener | None = None,
        stale_staging_s: float = 3600.0,
    ) -> None:
        self.root = Path(root)
        self.on_event = on_event
        self.stale_staging_s = stale_staging_s

    @classmethod
    def from_settings(
        cls, settings: RegistrySettings | None = None, *, on_event: EventListener | None = None
    ) -> Registry:
        s = settings or RegistrySettings()
        return cls(s.root, on_event=on_event, stale_staging_s=s.stale_staging_s)

    # ---- reading -------------------------------------------------------------------

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if NAME_RE.match(p.name) and (p / "versions").is_dir())

    def versions(self, name: str) -> list[str]:
        folder = self.root / _check_name(name) / "versions"
        if not folder.is_dir():
            return []
        found = [p.name for p in folder.iterdir() if VERSION_RE.match(p.name)]
        return sorted(found, key=lambda v: int(v[1:]))

    def list(self, name: str) -> list[ModelCard]:
        """Cards of every committed version of `name`, oldest first."""
        return [self._read_card(self._version_dir(name, v)) for v in self.versions(name)]

    def aliases(self, name: str) -> dict[str, str]:
        folder = self.root / _check_name(name) / "aliases"
        if not folder.is_dir():
            return {}
        out = {}
        for path in sorted(folder.glob("*.json")):
            if not NAME_RE.match(path.stem):
                continue
            try:
                state = self._read_alias(name, path.stem)
            except RegistryError as err:  # one damaged alias file hides itself, not the others
                log.warning("unreadable alias skipped", extra={"fields": {"error": str(err)}})
                continue
            if state is not None:
                out[path.stem] = state["version"]
        return out

    def current(self, name: str, alias: str = "production") -> str | None:
        """The version `name@alias` points to now, or None; one small file read, cheap to poll."""
        state = self._read_alias(_check_name(name), _check_alias(alias))
        return state["version"] if state else None

    def resolve(self, ref: str | Path) -> Path:
        """Folder of `name@alias`, `name@vNNNN`, `name@latest`, or of an existing model folder."""
        parsed = self._parse_ref(ref)
        if parsed is None:
            return Path(ref)
        name, version = parsed
        return self._version_dir(name, version)

    def card(self, ref: str | Path) -> ModelCard:
        return self._read_card(self.resolve(ref))

    def verify(self, ref: str | Path) -> None:
        """Raises RegistryError if a file of the version is missing or its bytes changed."""
        folder = self.resolve(ref)
        for rel, entry in self._read_card(folder).files.items():
            path = folder / rel
            if not path.is_file():
                raise RegistryError(f"{ref}: file {rel} is missing")
            if file_sha256(path) != entry.sha256:
                raise RegistryError(f"{ref}: file {rel} does not match its checksum")

    # ---- writing -------------------------------------------------------------------

    def register(
        self,
        name: str,
        src: Path | str,
        *,
        kind: Kind,
        parent: str | None = None,
        dataset_snapshot: dict[str, dict[int, int]] | None = None,
        training_config: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
        description: str = "",
        code_version_: str | None = None,
        move: bool = False,
    ) -> ModelCard:
        """Copies the model folder `src` in as the next version of `name`.

        `parent` is a registry ref; aliases are pinned to the version they point to now.
        `move` renames `src` in instead when it is on the registry's filesystem (no copy of
        the weights); an error gives it back, but a killed process leaves it to cleanup.
        """
        _check_name(name)
        src = Path(src)
        if not src.is_dir():
            raise RegistryError(f"cannot register {src}: not a folder")
        if kind not in ("policy", "reward"):
            raise RegistryError(f"kind must be 'policy' or 'reward', not {kind!r}")
        parent_ref = self.card(parent).ref if parent is not None else None
        self.cleanup_staging()
        staging_root = self.root / STAGING
        staging_root.mkdir(parents=True, exist_ok=True)
        token = f"{uuid.uuid4().hex}+{socket.gethostname()}+{os.getpid()}+{name}"
        staging = staging_root / token
        with _ACTIVE_LOCK:
            _ACTIVE.add(token)
        moved = False
        if move:
            try:
                os.rename(src, staging)
                moved = True
            except OSError:  # another filesystem: copy instead
                pass
        try:
            files = _stage_tree(staging if moved else src, staging)
            versions_dir = self.root / name / "versions"
            versions_dir.mkdir(parents=True, exist_ok=True)
            with self._locked(name):
                existing = self.versions(name)
                version = f"v{(int(existing[-1][1:]) if existing else 0) + 1:04d}"
                card = ModelCard(
                    name=name,
                    version=version,
                    kind=kind,
                    parent=parent_ref,
                    dataset_snapshot=dataset_snapshot or {},
                    training_config=training_config or {},
                    metrics=metrics or {},
                    code_version=code_version_ or code_version(),
                    created_at=datetime.now(UTC),
                    description=description,
                    files=files,
                )
                write_atomic(staging / CARD_FILE, card.model_dump_json(indent=2).encode())
                os.rename(staging, versions_dir / version)  # the commit point
                _fsync_dir(versions_dir)
                _fsync_dir(versions_dir.parent)
                _fsync_dir(self.root)
        except BaseException:
            if moved and staging.exists():
                os.rename(staging, src)  # give the caller's folder back
            else:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            with _ACTIVE_LOCK:
                _ACTIVE.discard(token)
        previous = parent_ref.split("@", 1)[1] if parent_ref and parent_ref.startswith(f"{name}@") else None
        self._emit("registered", name, version, None, previous)
        return card

    def promote(self, name: str, version: str, alias: str = "production") -> str:
        """Points `name@alias` at `version` (a version id, another alias, or 'latest').

        Returns the version; promoting the version the alias already has changes nothing.
        """
        _check_name(name)
        _check_alias(alias)
        target = self._version_of(name, version)
        with self._locked(name):
            state = self._read_alias(name, alias)
            previous = state["version"] if state else None
            if previous == target:
                return target
            stack = (state["stack"] if state else []) + [target]
            self._write_alias(name, alias, target, stack, state, "promoted", previous)
        self._emit("promoted", name, target, alias, previous)
        return target

    def rollback(self, name: str, alias: str = "production") -> str:
        """Moves `name@alias` back to the version it had before its last promotion."""
        _check_name(name)
        _check_alias(alias)
        with self._locked(name):
            state = self._read_alias(name, alias)
            if not state:
                raise NotFoundError(f"alias {name}@{alias} is not set")
            stack = list(state["stack"])
            if len(stack) < 2:
                raise RegistryError(f"{name}@{alias} has no earlier version to roll back to")
            previous = stack.pop()
            target = stack[-1]
            self._version_dir(name, target)  # versions are never deleted; fail loudly if one was
            self._write_alias(name, alias, target, stack, state, "rolled_back", previous)
        self._emit("rolled_back", name, target, alias, previous)
        return target

    def cleanup_staging(self) -> list[Path]:
        """Deletes unfinished registrations whose writer is gone; returns what it removed.

        A writer on this host is gone when its pid is dead; on another host (a different
        pod), when the folder is older than `stale_staging_s`.
        """
        folder = self.root / STAGING
        if not folder.is_dir():
            return []
        host, pid, now = socket.gethostname(), os.getpid(), time.time()
        removed = []
        for path in folder.iterdir():
            parts = path.name.split("+")
            if len(parts) == 4 and parts[1] == host and parts[2].isdigit():
                owner = int(parts[2])
                with _ACTIVE_LOCK:
                    mine = path.name in _ACTIVE
                stale = not mine if owner == pid else not _pid_alive(owner)
            else:
                try:
                    stale = now - path.stat().st_mtime > self.stale_staging_s
                except FileNotFoundError:
                    continue
            if stale:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        return removed

    # ---- alias history and audit (read by the workbench's versions page) ------------

    def alias_state(self, name: str, alias: str) -> dict[str, Any] | None:
        """The alias file as stored: version, the stack rollback walks back through, history."""
        return self._read_alias(_check_name(name), _check_alias(alias))

    def rollback_target(self, name: str, alias: str = "production") -> str | None:
        """The version `rollback` would move the alias to now, or None if it has none."""
        state = self.alias_state(name, alias)
        return state["stack"][-2] if state and len(state["stack"]) >= 2 else None

    def record_audit(self, name: str, entry: dict[str, Any]) -> dict[str, Any]:
        """Stores one audit entry next to the aliases; one file per entry, so writers on
        different hosts never contend and a reader never sees half of one."""
        folder = self.root / _check_name(name) / "audit"
        folder.mkdir(parents=True, exist_ok=True)
        now = datetime.now(UTC)
        entry = {"at": now.isoformat(), "id": uuid.uuid4().hex, **entry}
        write_atomic(folder / f"{now:%Y%m%dT%H%M%S%fZ}-{entry['id']}.json", json.dumps(entry, indent=2).encode())
        return entry

    def audit_log(self, name: str) -> list[dict[str, Any]]:
        """Every audit entry of `name`, oldest first (file names sort by time)."""
        folder = self.root / _check_name(name) / "audit"
        if not folder.is_dir():
            return []
        out = []
        for path in sorted(folder.glob("*.json")):
            try:
                out.append(json.loads(path.read_bytes()))
            except ValueError:  # a damaged entry hides itself, not the rest
                log.warning("unreadable audit entry skipped", extra={"fields": {"path": str(path)}})
        return out

    # ---- internals -----------------------------------------------------------------

    def _parse_ref(self, ref: str | Path) -> tuple[str, str] | None:
        """(name, version) for a registry ref, None for an existing folder; raises otherwise."""
        text = str(ref)
        if isinstance(ref, str) and "@" in text and "/" not in text:
            name, _, tag = text.partition("@")
            _check_name(name)
            if not tag:
                raise InvalidRefError(f"invalid model ref {text!r}: nothing after '@'")
            return name, self._version_of(name, tag)
        if Path(text).is_dir():
            return None
        raise InvalidRefError(
            f"invalid model ref {text!r}: expected NAME@ALIAS, NAME@vNNNN, NAME@latest or an existing folder"
        )

    def _version_of(self, name: str, tag: str) -> str:
        if not (self.root / name / "versions").is_dir():
            known = ", ".join(self.names()) or "none"
            raise NotFoundError(f"no model named {name!r} in registry {self.root} (known: {known})")
        if tag == LATEST:
            versions = self.versions(name)
            if not versions:
                raise NotFoundError(f"{name} has no versions")
            return versions[-1]
        if VERSION_RE.match(tag):
            self._version_dir(name, tag)
            return tag
        _check_name(tag, "alias or version")
        state = self._read_alias(name, tag)
        if not state:
            set_ = ", ".join(self.aliases(name)) or "none"
            raise NotFoundError(f"alias {name}@{tag} is not set (set aliases: {set_})")
        return state["version"]

    def _version_dir(self, name: str, version: str) -> Path:
        path = self.root / _check_name(name) / "versions" / version
        if not VERSION_RE.match(version) or not path.is_dir():
            raise NotFoundError(f"{name}@{version} does not exist in registry {self.root}")
        return path

    @staticmethod
    def _read_card(folder: Path) -> ModelCard:
        path = folder / CARD_FILE
        if not path.is_file():
            raise NotFoundError(f"{folder} has no {CARD_FILE}: not a registered model version")
        return ModelCard.model_validate_json(path.read_bytes())

    def _alias_path(self, name: str, alias: str) -> Path:
        return self.root / name / "aliases" / f"{alias}.json"

    def _read_alias(self, name: str, alias: str) -> dict[str, Any] | None:
        """The alias file's state, None when there is none; RegistryError for any other content."""
        path = self._alias_path(name, alias)
        try:
            state = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError) as err:
            raise RegistryError(f"{path}: not an alias file ({err})") from None
        version = state.get("version") if isinstance(state, dict) else None
        if not isinstance(version, str) or not VERSION_RE.match(version):
            raise RegistryError(f"{path}: not an alias file (no version like v0001)")
        if not isinstance(state.get("stack"), list):
            state["stack"] = [version]
        return state

    def _write_alias(
        self,
        name: str,
        alias: str,
        version: str,
        stack: list[str],
        old: dict[str, Any] | None,
        event: EventType,
        previous: str | None,
    ) -> None:
        now = datetime.now(UTC).isoformat()
        history = (old["history"] if old else []) + [
            {"at": now, "event": event, "version": version, "previous": previous}
        ]
        state = {
            "name": name,
            "alias": alias,
            "version": version,
            "updated_at": now,
            "stack": stack[-_HISTORY_KEEP:],  # the versions rollback walks back through
            "history": history[-_HISTORY_KEEP:],  # every move, for audit
        }
        path = self._alias_path(name, alias)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(state, indent=2).encode())

    @contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        lock = self.root / name / ".lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        with open(lock, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _emit(self, event: EventType, name: str, version: str, alias: str | None, previous: str | None) -> None:
        # The change is committed; a failing listener must not make it look failed. Serving
        # services also poll `current`, so a lost event delays a swap rather than losing it.
        if self.on_event is None:
            return
        try:
            self.on_event(event, name, version, alias, previous)
        except Exception:
            log.exception("registry event listener failed for %s %s@%s", event, name, version)


# ---- CLI commands: `tuneloop models list|show|promote|rollback` (models_cli.py adds them) ----


def registry_from_env() -> Registry:
    from tuneloop.common.settings import load_settings

    return Registry.from_settings(load_settings(RegistrySettings))


@contextmanager
def cli_errors() -> Iterator[None]:
    try:
        yield
    except RegistryError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None


def list_cmd(name: str | None = typer.Argument(None, help="Only this model name.")) -> None:
    """List versions with their kind, parent, creation time and aliases."""
    with cli_errors():
        reg = registry_from_env()
        for model in [name] if name else reg.names():
            by_version: dict[str, list[str]] = {}
            for alias, version in reg.aliases(model).items():
                by_version.setdefault(version, []).append(alias)
            for card in reg.list(model):
                tags = ",".join(by_version.get(card.version, [])) or "-"
                typer.echo(
                    f"{card.ref}\t{card.kind}\t{card.created_at:%Y-%m-%dT%H:%M:%SZ}\t"
                    f"parent={card.parent or '-'}\taliases={tags}"
                )


def show_cmd(ref: str = typer.Argument(..., help="NAME@ALIAS, NAME@vNNNN or NAME@latest.")) -> None:
    """Print a version's card as JSON."""
    with cli_errors():
        reg = registry_from_env()
        card = reg.card(ref)
        typer.echo(card.model_dump_json(indent=2))
        typer.echo(f"path: {reg.resolve(ref)}")


def promote_cmd(
    name: str,
    version: str = typer.Argument(..., help="vNNNN, an alias (e.g. candidate) or latest."),
    alias: str = typer.Option("production", help="Alias to move."),
) -> None:
    """Point an alias at a version (atomic)."""
    with cli_errors():
        target = registry_from_env().promote(name, version, alias)
        typer.echo(f"{name}@{alias} -> {target}")


def rollback_cmd(name: str, alias: str = typer.Option("production", help="Alias to move back.")) -> None:
    """Move an alias back to the version it had before its last promotion."""
    with cli_errors():
        target = registry_from_env().rollback(name, alias)
        typer.echo(f"{name}@{alias} -> {target}")
