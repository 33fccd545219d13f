"""A real Apache Kafka broker (single-node KRaft) on loopback, for local runs, demos and tests
(`tuneloop kafka`); nothing in a deployed service uses it.

No Python, npm or Debian package ships the broker, so `install` fetches its runtime jars from
Maven Central with the pom in `deploy/kafka/` into `.tools/kafka/libs`. `LocalBroker` formats a
data directory, runs `kafka.Kafka` there and knows when it serves: a metadata request answered
by the broker itself (`tuneloop.common.kafka.serves`), not an open port. Restarting keeps the
data directory and the ports, so fault drills can check that no acknowledged record is lost.

With `BrokerSecurity` every listener speaks SASL_SSL, the way an authenticated cluster does:
clients log in with SCRAM over TLS, the KRaft authorizer denies whatever no ACL allows, and the
only super user is the broker's own admin.
"""

from __future__ import annotations

import base64
import ctypes
import fcntl
import hashlib
import os
import random
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Annotated, Any

import typer

from tuneloop.common.kafka import serves

KAFKA_VERSION = "4.4.0"
NODE_ID = 1
_LOOPBACK = "127.0.0.1"
_PR_SET_PDEATHSIG = 1


class BrokerError(RuntimeError):
    """The broker could not be installed, started or reached."""


@dataclass(frozen=True)
class BrokerSecurity:
    """SASL_SSL on every listener, SCRAM users, ACLs enforced.

    `certfile` and `keyfile` are PEM files of the broker's certificate (naming the host it listens
    on) and its unencrypted PKCS#8 key; `cafile` is the CA that signed it, which clients trust.
    `users` (name to password) get SCRAM-SHA-512 and SCRAM-SHA-256 credentials when the data
    directory is formatted; `admin` is the super user the broker itself logs in as.
    """

    certfile: Path
    keyfile: Path
    cafile: Path
    admin_password: str
    users: Mapping[str, str] = field(default_factory=dict)
    admin: str = "admin"

    def client_options(self, username: str | None = None, password: str | None = None) -> dict[str, Any]:
        """kafka-python options to log in as `username` (default: the admin)."""
        if username is None:
            username, password = self.admin, self.admin_password
        return {
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_plain_username": username,
            "sasl_plain_password": password if password is not None else self.users[username],
            "ssl_cafile": str(self.cafile),
        }


def repo_root() -> Path:
    """The checkout this module lives in (editable install), else the working directory."""
    here = Path(__file__).resolve().parents[2]
    return here if (here / "deploy" / "kafka" / "pom.xml").is_file() else Path.cwd()


def default_home(root: Path | None = None) -> Path:
    return (root or repo_root()) / ".tools" / "kafka"


_PORTS = random.SystemRandom()  # not the seeded global generator: tests seed it


def free_port() -> int:
    """A TCP port free on loopback right now, below the kernel's ephemeral range.

    The port is handed to a process that binds it later, sometimes a minute later (after a
    model loads). A port from the ephemeral range could meanwhile be given by the kernel to any
    other socket (a client connection, vLLM's engine sockets), and the bind then fails; the
    kernel never hands out ports below that range on its own."""
    low, _ = _ephemeral_range()
    for _ in range(200):
        port = _PORTS.randrange(max(1024, low - 12000), low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((_LOOPBACK, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port found below the ephemeral range (from {low})")


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def install(root: Path | None = None) -> Path:
    """Fetch the broker's runtime jars (and its logging config) once; return the Kafka home.

    A stamp holds the hash of the pom and the logging config, so editing either re-fetches
    and an interrupted fetch never passes for a finished one.
    """
    root = root or repo_root()
    src = root / "deploy" / "kafka"
    pom, log_config = src / "pom.xml", src / "log4j2.properties"
    if not pom.is_file():
        raise BrokerError(f"no {pom}: installing the local broker needs a tuneloop checkout")
    home = default_home(root)
    libs, stamp = home / "libs", home / "libs.stamp"
    digest = hashlib.sha256(pom.read_bytes() + log_config.read_bytes()).hexdigest()

    def current() -> bool:
        return stamp.is_file() and stamp.read_text().strip() == digest and libs.is_dir()

    if current():
        return home
    home.mkdir(parents=True, exist_ok=True)
    # Test runs started side by side may all find the jars missing: one fetches, the rest wait.
    with (home / "install.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not current():
            _fetch(pom, libs)
            shutil.copyfile(log_config, home / "log4j2.properties")
            stamp.write_text(digest + "\n")
    return home


def _fetch(pom: Path, libs: Path) -> None:
    mvn = shutil.which("mvn")
    if mvn is None:
        raise BrokerError("Maven (`mvn`) is needed to fetch the Kafka broker jars; install it first")
    partial = libs.with_name("libs.partial")
    shutil.rmtree(partial, ignore_errors=True)
    cmd = [mvn, "-B", "-q", "-f", str(pom), "dependency:copy-dependencies",
           "-DincludeScope=runtime", f"-DoutputDirectory={partial}"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BrokerError(f"mvn failed ({done.returncode}):\n{(done.stdout + done.stderr)[-4000:]}")
    if not (partial / f"kafka_2.13-{KAFKA_VERSION}.jar").is_file():
        raise BrokerError(f"mvn finished but kafka_2.13-{KAFKA_VERSION}.jar is not in {partial}")
    shutil.rmtree(libs, ignore_errors=True)
    partial.rename(libs)


def java_executable() -> str:
    java_home = os.environ.get("JAVA_HOME")
    java = str(Path(java_home) / "bin" / "java") if java_home else shutil.which("java")
    if not java or not Path(java).is_file():
        raise BrokerError("no `java` found (set JAVA_HOME or put java on PATH); Kafka needs Java 17+")
    return java


def _cluster_id() -> str:
    """A KRaft cluster id as `StorageTool random-uuid` makes one, without starting a JVM.

    Kafka's ids are unpadded URL-safe base64 of 16 random bytes and never start with '-'
    (it would read as a command-line flag).
    """
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not text.startswith("-"):
            return text


def die_with_parent() -> None:
    """For a child process, before exec: if the process that started it dies without cleaning
    up, the kernel sends it SIGTERM instead of leaving it orphaned. The kernel watches the
    thread that forked, so start children from a thread that outlives them."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class LocalBroker:
    """One KRaft node (broker and controller), its state under `data_dir`.

    It listens on 127.0.0.1 unless `host` names another local address (a bridge that pods in
    their own network namespaces reach it through).

    Ports left out are picked free once, at construction, and kept across restarts so that
    clients reconnect to the same address.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        controller_port: int | None = None,
        home: Path | None = None,
        heap: str = "512m",
        startup_timeout_s: float = 90.0,
        die_with_parent: bool = True,
        host: str = _LOOPBACK,
        security: BrokerSecurity | None = None,
    ) -> None:
        self.host = host
        self.security = security
        self.data_dir = Path(data_dir).resolve()
        self.port = port or free_port()
        self.controller_port = controller_port or free_port()
        if self.controller_port == self.port:
            raise BrokerError(f"broker and controller need different ports (both {self.port})")
        self.home = (home or default_home()).resolve()
        self.heap = heap
        self.startup_timeout_s = startup_timeout_s
        self.die_with_parent = die_with_parent
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.data_dir / "server.properties"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "broker.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _write_config(self) -> None:
        voters = f"{NODE_ID}@{self.host}:{self.controller_port}"
        props = {
            "process.roles": "broker,controller",
            "node.id": str(NODE_ID),
            "controller.quorum.voters": voters,
            "listeners": f"PLAINTEXT://{self.host}:{self.port},CONTROLLER://{self.host}:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://{self.host}:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            **self._security_props(),
            "log.dirs": str(self.data_dir / "logs"),
            # One node: every internal topic must be satisfiable by a single replica.
            "offsets.topic.replication.factor": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            # 50 partitions each (the defaults) spread load over a cluster; on one node they
            # only slow creation, restart and recovery.
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.num.partitions": "4",
            "share.coordinator.state.topic.num.partitions": "4",
            # Groups form at once instead of waiting 3 s for more members.
            "group.initial.rebalance.delay.ms": "0",
            # Topics exist only when created on purpose (ensure_topics), never by a typo.
            "auto.create.topics.enable": "false",
        }
        self.config_path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))

    def _security_props(self) -> dict[str, str]:
        sec = self.security
        if sec is None:
            return {}
        # Kafka reads a PEM key store as one file: the private key, then the certificate chain.
        keystore = self.data_dir / "keystore.pem"
        keystore.write_text(Path(sec.keyfile).read_text() + Path(sec.certfile).read_text())
        keystore.chmod(0o600)
        scram = ("org.apache.kafka.common.security.scram.ScramLoginModule required "
                 f'username="{sec.admin}" password="{sec.admin_password}";')
        # SCRAM credentials live in the metadata log the controller serves, so the controller
        # listener cannot check them: it takes PLAIN, with the admin as its only user.
        plain = ("org.apache.kafka.common.security.plain.PlainLoginModule required "
                 f'username="{sec.admin}" password="{sec.admin_password}" '
                 f'user_{sec.admin}="{sec.admin_password}";')
        return {
            "listeners": f"SASL_SSL://{self.host}:{self.port},CONTROLLER://{self.host}:{self.controller_port}",
            "advertised.listeners": f"SASL_SSL://{self.host}:{self.port}",
            "inter.broker.listener.name": "SASL_SSL",
            "listener.security.protocol.map": "CONTROLLER:SASL_SSL,SASL_SSL:SASL_SSL",
            "sasl.mechanism.inter.broker.protocol": "SCRAM-SHA-512",
            "listener.name.sasl_ssl.sasl.enabled.mechanisms": "SCRAM-SHA-512,SCRAM-SHA-256",
            "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config": scram,
            "listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config": scram,
            "sasl.mechanism.controller.protocol": "PLAIN",
            "listener.name.controller.sasl.enabled.mechanisms": "PLAIN",
            "listener.name.controller.plain.sasl.jaas.config": plain,
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": str(keystore),
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(Path(sec.cafile).resolve()),
            "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "super.users": f"User:{sec.admin}",
            "allow.everyone.if.no.acl.found": "false",
        }

    def client_options(self) -> dict[str, Any]:
        """kafka-python options an admin client of this broker needs (none without security)."""
        return self.security.client_options() if self.security else {}

    def _java_cmd(self, main: str, *args: str, heap: str) -> list[str]:
        return [
            java_executable(), f"-Xmx{heap}", "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.home / 'log4j2.properties'}",
            "-cp", str(self.home / "libs" / "*"), main, *args,
        ]

    def _format(self) -> None:
        if (self.data_dir / "logs" / "meta.properties").is_file():
            return
        scram: list[str] = []
        if self.security is not None:
            users = {**self.security.users, self.security.admin: self.security.admin_password}
            for name, password in users.items():
                for mechanism in ("SCRAM-SHA-512", "SCRAM-SHA-256"):
                    scram += ["--add-scram", f"{mechanism}=[name={name},password={password}]"]
        cmd = self._java_cmd("kafka.tools.StorageTool", "format", "-t", _cluster_id(),
                             "-c", str(self.config_path), "--ignore-formatted", *scram, heap="256m")
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise BrokerError(f"formatting {self.data_dir} failed:\n{(done.stdout + done.stderr)[-4000:]}")

    def start(self) -> LocalBroker:
        """Start the broker (formatting the data dir on first use) and wait until it serves."""
        if self.running:
            return self
        if not (self.home / "libs").is_dir():
            raise BrokerError(f"no Kafka jars in {self.home / 'libs'}: run `tuneloop kafka install`")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        self._format()
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                self._java_cmd("kafka.Kafka", str(self.config_path), heap=self.heap),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.data_dir, start_new_session=True,
                preexec_fn=die_with_parent if self.die_with_parent else None,
            )
        try:
            self.wait_until_serving()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_until_serving(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                raise BrokerError(f"broker exited with {code} while starting; log tail:\n{self.log_tail()}")
            if serves(self.bootstrap, security=self.client_options()):
                return
            time.sleep(0.25)
        raise BrokerError(
            f"broker at {self.bootstrap} did not serve within {self.startup_timeout_s:.0f} s; "
            f"log tail:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return f"(no log at {self.log_path})"

    def stop(self, timeout_s: float = 30.0) -> None:
        """Shut down cleanly (SIGTERM); SIGKILL if that takes longer than `timeout_s`."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def kill(self) -> None:
        """Crash the broker (SIGKILL): no flush, no controlled shutdown."""
        if self._proc is None:
            return
        self._proc.kill()
        self._proc.wait()
        self._proc = None

    def restart(self, *, crash: bool = False) -> None:
        """Stop (or crash) and start again on the same data dir and ports."""
        if crash:
            self.kill()
        else:
            self.stop()
        self.start()

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


# --- `tuneloop kafka`: a broker that outlives the command, found again by its pid file ---

cli = typer.Typer(help="The local Apache Kafka broker (single-node KRaft on loopback).", no_args_is_help=True)

DataDir = Annotated[Path | None, typer.Option(help="Broker state: config, logs, pid file. Default: .tools/kafka/data.")]


def _data_dir(data_dir: Path | None) -> Path:
    return (data_dir or default_home() / "data").resolve()


def _pid_file(data_dir: Path) -> Path:
    return data_dir / "broker.pid"


def _live_pid(data_dir: Path) -> int | None:
    """The pid in the pid file if that process is still this data dir's broker."""
    try:
        pid = int(_pid_file(data_dir).read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ValueError):
        return None
    # A recycled pid belongs to someone else: only a kafka.Kafka on our config is ours.
    ours = b"kafka.Kafka" in cmdline and str(data_dir / "server.properties").encode() in cmdline
    return pid if ours else None


def _alive(pid: int) -> bool:
    """Whether `pid` still runs; an exited child of ours is reaped, not mistaken for alive."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass  # not our child: its own parent (or init) reaps it
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _configured_bootstrap(data_dir: Path) -> str | None:
    try:
        for line in (data_dir / "server.properties").read_text().splitlines():
            if line.startswith("advertised.listeners="):
                return line.split("PLAINTEXT://", 1)[1].split(",", 1)[0]
    except FileNotFoundError:
        pass
    return None


@cli.command("install")
def install_cmd() -> None:
    """Fetch the broker jars from Maven Central (skipped when already there)."""
    typer.echo(install())


@cli.command("start")
def start_cmd(
    port: Annotated[int, typer.Option(help="PLAINTEXT listener port (clients).")] = 9092,
    controller_port: Annotated[int, typer.Option(help="KRaft controller listener port.")] = 9093,
    data_dir: DataDir = None,
) -> None:
    """Start the broker in the background; print its bootstrap address once it serves."""
    data_dir = _data_dir(data_dir)
    pid = _live_pid(data_dir)
    if pid is not None:
        typer.echo(_configured_bootstrap(data_dir))
        typer.echo(f"already running (pid {pid})", err=True)
        return
    broker = LocalBroker(data_dir, port=port, controller_port=controller_port,
                         home=install(), die_with_parent=False)
    try:
        broker.start()
    except BrokerError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(1) from err
    _pid_file(data_dir).write_text(f"{broker.pid}\n")
    typer.echo(broker.bootstrap)
    typer.echo(f"pid {broker.pid}, log {broker.log_path}", err=True)


@cli.command("stop")
def stop_cmd(
    data_dir: DataDir = None,
    timeout_s: Annotated[float, typer.Option(help="Seconds to wait for a clean shutdown before SIGKILL.")] = 30.0,
) -> None:
    """Stop the background broker started by `start`."""
    data_dir = _data_dir(data_dir)
    pid = _live_pid(data_dir)
    if pid is None:
        typer.echo("not running", err=True)
        _pid_file(data_dir).unlink(missing_ok=True)
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
    _pid_file(data_dir).unlink(missing_ok=True)
    typer.echo(f"stopped (pid {pid})", err=True)


@cli.command("status")
def status_cmd(data_dir: DataDir = None) -> None:
    """Say whether the background broker runs and serves; exit 1 when it does not."""
    data_dir = _data_dir(data_dir)
    pid, bootstrap = _live_pid(data_dir), _configured_bootstrap(data_dir)
    if pid is None or bootstrap is None:
        typer.echo("not running")
        raise typer.Exit(1)
    if not serves(bootstrap):
        typer.echo(f"running (pid {pid}) but not serving at {bootstrap}; log {data_dir / 'broker.log'}")
        raise typer.Exit(1)
    typer.echo(f"serving at {bootstrap} (pid {pid})")
