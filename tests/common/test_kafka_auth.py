"""Kafka with authentication: a real broker with only SASL_SSL listeners (certificates made here),
SCRAM users and the services' ACLs from `tuneloop.common.kafka_acls`.

Clients without a login, with a wrong password or without TLS are refused; each service's user,
configured by the very TUNELOOP_KAFKA_* variables the chart renders for its pods, does what its
service does and nothing else; the Feedback service runs end to end over SASL_SSL. The Strimzi
KafkaUsers are checked to be the same table.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kafka import KafkaAdminClient, TopicPartition
from kafka.errors import (
    GroupAuthorizationFailedError,
    KafkaTimeoutError,
    TopicAuthorizationFailedError,
)
from pydantic import ValidationError

from tests.support.kafka_security import kafka_env_of, make_tls, settings_from_env
from tuneloop.common.kafka import (
    ALL_TOPICS,
    COMPLETIONS_TOPIC,
    FEEDBACK_DLQ_TOPIC,
    FEEDBACK_TOPIC,
    MODELS_TOPIC,
    KafkaSettings,
    client_security,
    ensure_topics,
    make_admin,
    make_consumer,
    make_producer,
    serves,
)
from tuneloop.common.kafka_acls import (
    MODEL_WATCH_GROUP_PREFIX,
    REWARD_WATCH_GROUP_PREFIX,
    SERVICE_ACLS,
    STORE_GROUP,
    kafka_acls,
    strimzi_acls,
    username,
)
from tuneloop.common.local_kafka import BrokerSecurity, LocalBroker, install

REPO = Path(__file__).resolve().parents[2]
STRIMZI = REPO / "deploy" / "strimzi"
CA_SECRET = "tuneloop-cluster-ca-cert"


# ---------------------------------------------------------------- settings (no broker)


def _sasl(**overrides: Any) -> dict[str, Any]:
    return {"security_protocol": "SASL_SSL", "sasl_username": "u", "sasl_password": "p", **overrides}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (_sasl(sasl_username=None), "sasl_username (TUNELOOP_KAFKA_SASL_USERNAME) is required"),
        (_sasl(sasl_password=None), "give exactly one of sasl_password (TUNELOOP_KAFKA_SASL_PASSWORD)"),
        (_sasl(sasl_password_file=__file__), "give exactly one of sasl_password"),
        ({"sasl_username": "u"}, "sasl_username is set but security_protocol PLAINTEXT does not use SASL"),
        (_sasl(security_protocol="SASL_PLAINTEXT", ssl_cafile=__file__), "ssl_cafile is set but"),
        (_sasl(ssl_keyfile=__file__), "ssl_keyfile needs ssl_certfile"),
        (_sasl(ssl_cafile="/no/such/ca.crt"), "ssl_cafile"),
        (_sasl(sasl_mechanism="PLAIN"), "sasl_mechanism"),
    ],
)
def test_half_configured_security_is_refused_naming_the_setting(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        KafkaSettings(**values)


def test_every_client_gets_the_same_login_and_a_password_file_is_read(tmp_path: Path) -> None:
    password = tmp_path / "password"
    password.write_text("s3cret\n")
    ca = tmp_path / "ca.crt"
    ca.write_text("pem")
    settings = KafkaSettings(
        security_protocol="SASL_SSL", sasl_username="tuneloop-store", sasl_password_file=password, ssl_cafile=ca
    )
    assert client_security(settings) == {
        "security_protocol": "SASL_SSL",
        "ssl_check_hostname": True,
        "ssl_cafile": str(ca),
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "tuneloop-store",
        "sasl_plain_password": "s3cret",
    }
    # The secret never shows in the settings' repr (logs, error reports).
    assert "s3cret" not in repr(KafkaSettings(**_sasl(sasl_password="s3cret")))
    assert client_security(KafkaSettings()) == {"security_protocol": "PLAINTEXT"}


# ---------------------------------------------------------------- the Strimzi users are the table


def _strimzi_docs(path: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((STRIMZI / path).read_text()) if d]


def test_strimzi_kafka_users_are_the_services_acl_table() -> None:
    users = {d["metadata"]["name"]: d for d in _strimzi_docs("users.yaml") if d["kind"] == "KafkaUser"}
    assert set(users) == {username(s) for s in SERVICE_ACLS}
    kafka_cr = next(d for d in _strimzi_docs("kafka.yaml") if d["kind"] == "Kafka")
    listeners = kafka_cr["spec"]["kafka"]["listeners"]
    for service in SERVICE_ACLS:
        user = users[username(service)]
        assert user["metadata"]["labels"]["strimzi.io/cluster"] == kafka_cr["metadata"]["name"]
        assert user["spec"]["authentication"] == {"type": "scram-sha-512"}
        assert user["spec"]["authorization"] == {"type": "simple", "acls": strimzi_acls(service)}
    # Every client listener asks for a login over TLS; the brokers enforce ACLs.
    assert listeners and all(lst["tls"] and lst["authentication"] == {"type": "scram-sha-512"} for lst in listeners)
    assert all(lst.get("networkPolicyPeers") for lst in listeners)
    assert kafka_cr["spec"]["kafka"]["authorization"]["type"] == "simple"


def test_the_acl_groups_are_the_ones_the_services_use() -> None:
    from tuneloop.store.settings import StoreSettings

    assert StoreSettings.model_fields["group_id"].default == STORE_GROUP
    swap = (REPO / "services" / "generation" / "swap.py").read_text()
    assert 'f"{MODEL_WATCH_GROUP_PREFIX}' in swap
    reward = (REPO / "services" / "reward" / "server.py").read_text()
    assert 'f"{REWARD_WATCH_GROUP_PREFIX}' in reward


# ---------------------------------------------------------------- a broker that asks for logins


class Secured:
    """The broker, its users' passwords and the CA, and the rendered chart's Kafka env per workload."""

    def __init__(self, broker: LocalBroker, security: BrokerSecurity, passwords: dict[str, str]) -> None:
        self.broker, self.security, self.passwords = broker, security, passwords
        self.env: dict[str, dict[str, str]] = {}

    def admin_settings(self) -> KafkaSettings:
        return KafkaSettings(
            bootstrap_servers=self.broker.bootstrap, security_protocol="SASL_SSL", sasl_username=self.security.admin,
            sasl_password=self.security.admin_password, ssl_cafile=self.security.cafile,
        )

    def settings(self, service: str, **overrides: Any) -> KafkaSettings:
        """The workload's settings, loaded from the env the chart renders for its pods."""
        return KafkaSettings(**{**settings_from_env(self.env[service]).model_dump(), **overrides})

    def refusals(self) -> str:
        return self.broker.log_path.read_text(errors="replace")


def _chart_kafka_env(secured: Secured, root: Path) -> dict[str, dict[str, str]]:
    """Render the chart with kafka.auth on, pointed at this broker; each workload's Kafka env."""
    from tests.support.chart import HELM, helm, pod_specs, template_args

    if not HELM.exists():
        pytest.skip(f"helm not built at {HELM} (run `make setup`)")
    port = secured.broker.port
    out = helm(*template_args([], "--set", "kafka.auth.enabled=true", "--set",
                              f"kafka.bootstrapServers={secured.broker.bootstrap}", "--set", f"kafka.ports={{{port}}}"))
    objs = [d for d in yaml.safe_load_all(out.stdout) if d]
    # What Strimzi's User Operator and cluster CA put in the Secrets the chart reads.
    values = yaml.safe_load((REPO / "charts" / "tuneloop" / "values.yaml").read_text())["kafka"]["auth"]
    k8s_secrets: dict[str, dict[str, str]] = {
        values["users"][s]: {values["passwordKey"]: secured.passwords[username(s)]} for s in SERVICE_ACLS
    }
    k8s_secrets[values["caSecret"]["name"]] = {values["caSecret"]["key"]: secured.security.cafile.read_text()}
    envs = {}
    for key, spec in pod_specs(objs).items():
        component = spec["containers"][0]["name"]
        if key.startswith("Pod/"):
            continue
        envs[component] = kafka_env_of(spec, k8s_secrets, root / key.replace("/", "_"))
    return envs


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    folder = tmp_path_factory.mktemp("kafka-auth")
    tls = make_tls(folder / "tls")
    passwords = {username(s): secrets.token_urlsafe(18) for s in SERVICE_ACLS}
    security = BrokerSecurity(tls.certfile, tls.keyfile, tls.cafile, secrets.token_urlsafe(18), passwords)
    broker = LocalBroker(folder / "data", home=install(), security=security)
    broker.start()
    try:
        s = Secured(broker, security, passwords)
        # Provisioned as on the cluster (KafkaTopics, KafkaUsers), by the only super user.
        ensure_topics(s.admin_settings(), ALL_TOPICS)
        with make_admin(s.admin_settings()) as admin:
            result = admin.create_acls([acl for service in SERVICE_ACLS for acl in kafka_acls(service)])
            assert not result["failed"], result["failed"]
        s.env = _chart_kafka_env(s, folder / "pods")
        yield s
    finally:
        broker.stop()


def _refused(secured: Secured, connect: Callable[[], Any], reason: str) -> None:
    before = secured.refusals().count(reason)
    with pytest.raises(KafkaTimeoutError, match="Unable to bootstrap"):
        connect()
    # kafka-python only sees the connection dropped; the broker says why.
    deadline = time.monotonic() + 10
    while secured.refusals().count(reason) == before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert secured.refusals().count(reason) > before, reason


def test_unauthenticated_clients_are_refused(secured: Secured) -> None:
    bootstrap = secured.broker.bootstrap
    fast = {"request_timeout_ms": 3000, "bootstrap_timeout_ms": 3000}
    # PLAINTEXT to the SASL_SSL listener: no TLS handshake, no request is read.
    _refused(secured, lambda: KafkaAdminClient(bootstrap_servers=bootstrap, **fast), "(SSL handshake failed)")
    assert not serves(bootstrap, timeout_s=2.0)
    # TLS without a login: the broker wants a SASL handshake first.
    tls_only = {"security_protocol": "SSL", "ssl_cafile": str(secured.security.cafile)}
    _refused(secured, lambda: KafkaAdminClient(bootstrap_servers=bootstrap, **tls_only, **fast),
             "Unexpected Kafka request of type METADATA during SASL handshake")
    # A service's user with a wrong password, through the project's own client setup.
    wrong = client_security(secured.settings("feedback", sasl_password="not-the-password"))
    _refused(secured, lambda: KafkaAdminClient(bootstrap_servers=bootstrap, **wrong, **fast),
             "invalid credentials with SASL mechanism SCRAM-SHA-512")
    # The KRaft controller's listener is no way around it.
    controller = f"127.0.0.1:{secured.broker.controller_port}"
    _refused(secured, lambda: KafkaAdminClient(bootstrap_servers=controller, **fast), "(SSL handshake failed)")


def test_the_chart_gives_each_kafka_workload_its_own_user_over_sasl_ssl(secured: Secured) -> None:
    assert set(secured.env) >= set(SERVICE_ACLS)
    for service in SERVICE_ACLS:
        settings = settings_from_env(secured.env[service])
        assert (settings.security_protocol, settings.sasl_username) == ("SASL_SSL", username(service))
        assert settings.ssl_cafile is not None and settings.ssl_cafile.read_text() == secured.security.cafile.read_text()
    for service in set(secured.env) - set(SERVICE_ACLS):
        assert settings_from_env(secured.env[service]).security_protocol == "PLAINTEXT", service
        assert "TUNELOOP_KAFKA_SASL_PASSWORD" not in secured.env[service]


def _produce(settings: KafkaSettings, topic: str, value: bytes) -> None:
    producer = make_producer(settings)
    try:
        producer.send(topic, key=b"k", value=value).get(timeout=30)
    finally:
        producer.close(timeout=10)


def _read(settings: KafkaSettings, group: str, topic: str, wanted: bytes | Callable[[bytes], bool],
          timeout_s: float = 30.0) -> bool:
    """Whether the group's consumer finds the record (committing what it read)."""
    match = wanted if callable(wanted) else wanted.__eq__
    consumer = make_consumer(settings, group, [topic])
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                if any(match(r.value) for r in records):
                    consumer.commit()
                    return True
        return False
    finally:
        consumer.close()


def test_each_service_user_does_what_its_service_does(secured: Secured) -> None:
    feedback, store = secured.settings("feedback"), secured.settings("store")
    generation, trainer = secured.settings("generation"), secured.settings("trainer")
    marker = uuid.uuid4().hex.encode()
    _produce(feedback, FEEDBACK_TOPIC, b"feedback-" + marker)
    _produce(generation, COMPLETIONS_TOPIC, b"completion-" + marker)
    _produce(trainer, MODELS_TOPIC, b"model-" + marker)
    _produce(store, FEEDBACK_DLQ_TOPIC, b"dead-" + marker)
    assert _read(store, STORE_GROUP, FEEDBACK_TOPIC, b"feedback-" + marker)
    assert _read(store, STORE_GROUP, COMPLETIONS_TOPIC, b"completion-" + marker)
    assert _read(generation, f"{MODEL_WATCH_GROUP_PREFIX}{uuid.uuid4().hex[:12]}", MODELS_TOPIC, b"model-" + marker)
    # The workbench's promotions reach the reward service's own watch group.
    reward, gateway = secured.settings("reward"), secured.settings("gateway")
    _produce(gateway, MODELS_TOPIC, b"promoted-" + marker)
    assert _read(reward, f"{REWARD_WATCH_GROUP_PREFIX}{uuid.uuid4().hex[:12]}", MODELS_TOPIC, b"promoted-" + marker)
    # Topics already provisioned: ensure_topics only looks, which each service may.
    assert ensure_topics(feedback, [FEEDBACK_TOPIC]) == set()
    assert ensure_topics(store, [FEEDBACK_TOPIC, COMPLETIONS_TOPIC, FEEDBACK_DLQ_TOPIC]) == set()


@pytest.mark.parametrize(
    ("service", "action", "error"),
    [
        ("feedback", ("produce", COMPLETIONS_TOPIC), TopicAuthorizationFailedError),
        ("feedback", ("produce", MODELS_TOPIC), TopicAuthorizationFailedError),
        ("generation", ("produce", FEEDBACK_TOPIC), TopicAuthorizationFailedError),
        ("store", ("produce", FEEDBACK_TOPIC), TopicAuthorizationFailedError),
        ("trainer", ("produce", COMPLETIONS_TOPIC), TopicAuthorizationFailedError),
        ("generation", ("consume", FEEDBACK_TOPIC, f"{MODEL_WATCH_GROUP_PREFIX}x"), TopicAuthorizationFailedError),
        ("generation", ("consume", COMPLETIONS_TOPIC, f"{MODEL_WATCH_GROUP_PREFIX}x"), TopicAuthorizationFailedError),
        ("trainer", ("consume", MODELS_TOPIC, STORE_GROUP), GroupAuthorizationFailedError),
        ("reward", ("consume", FEEDBACK_TOPIC, f"{REWARD_WATCH_GROUP_PREFIX}x"), TopicAuthorizationFailedError),
        ("reward", ("consume", MODELS_TOPIC, f"{MODEL_WATCH_GROUP_PREFIX}x"), GroupAuthorizationFailedError),
        ("gateway", ("produce", FEEDBACK_TOPIC), TopicAuthorizationFailedError),
        ("gateway", ("consume", MODELS_TOPIC, f"{REWARD_WATCH_GROUP_PREFIX}x"), GroupAuthorizationFailedError),
        ("store", ("consume", FEEDBACK_TOPIC, "someone-elses-group"), GroupAuthorizationFailedError),
        ("feedback", ("create", "tuneloop.unprovisioned.v1"), TopicAuthorizationFailedError),
    ],
    ids=lambda v: v if isinstance(v, str) else (v[0] + "-" + v[1] if isinstance(v, tuple) else v.__name__),
)
def test_service_users_are_refused_what_their_service_does_not_do(
    secured: Secured, service: str, action: tuple[str, ...], error: type[Exception]
) -> None:
    settings = secured.settings(service, request_timeout_ms=10_000, delivery_timeout_ms=15_000)
    kind, topic = action[0], action[1]
    with pytest.raises(error):
        if kind == "produce":
            _produce(settings, topic, b"not allowed")
        elif kind == "consume":
            # Assigned, not subscribed: a subscription to a topic the user may not see only stays
            # empty, while a fetch (or the group's offsets) is answered with the refusal.
            consumer = make_consumer(settings, action[2])
            consumer.assign([TopicPartition(topic, 0)])
            try:
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    consumer.poll(timeout_ms=500)
            finally:
                consumer.close()
        else:
            ensure_topics(settings, [topic])


def test_feedback_service_runs_end_to_end_over_sasl_ssl(secured: Secured) -> None:
    """The real Feedback server as its pod runs it: produce as tuneloop-feedback, warm the dedup
    window from the topic after a restart; the store's user then reads the event."""
    from tests.support.feedback import ACCEPTED, DUPLICATE, feedback_settings, pairwise, stub_for
    from tuneloop.feedback.server import build_server

    kafka = secured.settings("feedback")
    settings = feedback_settings(FEEDBACK_TOPIC, warm_dedup_records=100)
    event = pairwise()
    with build_server(settings, kafka) as server:
        assert stub_for(server).Submit(event, timeout=30).status == ACCEPTED
    # A new process knows the event only from Kafka: its warm-up read the topic as tuneloop-feedback.
    with build_server(settings, kafka) as server:
        assert stub_for(server).Submit(event, timeout=30).status == DUPLICATE
    from tuneloop.v1 import feedback_pb2

    def is_event(value: bytes) -> bool:
        return feedback_pb2.FeedbackEvent.FromString(value).event_id == event.event_id

    assert _read(secured.settings("store"), STORE_GROUP, FEEDBACK_TOPIC, is_event)
