"""Who may do what on Kafka: one user per service, with exactly the rights its clients use.

This table is the single source of the services' Kafka rights. The Strimzi KafkaUsers in
`deploy/strimzi/users.yaml` are checked against it by the tests, and the test broker grants it
with `create_acls`, so what is tested is what is deployed.

Why each right:
- Read on a topic lets a client fetch it (and implies Describe); Write lets it produce. An
  idempotent producer needs nothing on the cluster since Kafka 3.0: Write on a topic suffices.
- Describe on a topic answers metadata and ListOffsets; `ensure_topics` only lists topics
  where the cluster provisions them (Strimzi's topic operator), so no service may Create.
- Read on a group lets a consumer join it and commit offsets there.
- The gateway talks to Kafka only to announce the workbench's promotions and rollbacks
  (TUNELOOP_GATEWAY_MODEL_EVENTS_BOOTSTRAP_SERVERS); without that its user is never used.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from tuneloop.common.kafka import COMPLETIONS_TOPIC, FEEDBACK_DLQ_TOPIC, FEEDBACK_TOPIC, MODELS_TOPIC

# The generation and reward replicas each watch model events in a group of their own (every
# replica must see every event), named with their service's prefix and a random suffix.
MODEL_WATCH_GROUP_PREFIX = "tuneloop-generation-watch-"
REWARD_WATCH_GROUP_PREFIX = "tuneloop-reward-watch-"
STORE_GROUP = "tuneloop-store"

# Operation names as Strimzi spells them in a KafkaUser.
Operation = Literal["Read", "Write", "Describe", "Create", "IdempotentWrite"]


@dataclass(frozen=True)
class AclRule:
    resource: Literal["topic", "group", "transactionalId", "cluster"]
    name: str
    operations: tuple[Operation, ...]
    pattern: Literal["literal", "prefix"] = "literal"


SERVICE_ACLS: dict[str, tuple[AclRule, ...]] = {
    # Produces accepted feedback; reads the topic's tail at start to warm its dedup window.
    "feedback": (AclRule("topic", FEEDBACK_TOPIC, ("Describe", "Read", "Write")),),
    # Publishes every completion; follows model events to hot-swap.
    "generation": (
        AclRule("topic", COMPLETIONS_TOPIC, ("Describe", "Write")),
        AclRule("topic", MODELS_TOPIC, ("Describe", "Read")),
        AclRule("group", MODEL_WATCH_GROUP_PREFIX, ("Read",), pattern="prefix"),
    ),
    # Joins feedback with completions in its consumer group; dead-letters what it cannot use.
    "store": (
        AclRule("topic", FEEDBACK_TOPIC, ("Describe", "Read")),
        AclRule("topic", COMPLETIONS_TOPIC, ("Describe", "Read")),
        AclRule("topic", FEEDBACK_DLQ_TOPIC, ("Describe", "Write")),
        AclRule("group", STORE_GROUP, ("Read",)),
    ),
    # Follows model events to swap the reward model at once (it polls the registry too).
    "reward": (
        AclRule("topic", MODELS_TOPIC, ("Describe", "Read")),
        AclRule("group", REWARD_WATCH_GROUP_PREFIX, ("Read",), pattern="prefix"),
    ),
    # Announces registered, promoted and rolled-back models.
    "trainer": (AclRule("topic", MODELS_TOPIC, ("Describe", "Write")),),
    # Announces the promotions and rollbacks made on the workbench's versions page.
    "gateway": (AclRule("topic", MODELS_TOPIC, ("Describe", "Write")),),
}


def username(service: str) -> str:
    """The Kafka user (and Strimzi KafkaUser, and its password Secret) of a service."""
    if service not in SERVICE_ACLS:
        raise KeyError(f"{service!r} has no Kafka user; services with one: {', '.join(sorted(SERVICE_ACLS))}")
    return f"tuneloop-{service}"


def strimzi_acls(service: str) -> list[dict[str, Any]]:
    """The rules as a Strimzi KafkaUser's `spec.authorization.acls`."""
    out = []
    for rule in SERVICE_ACLS[service]:
        resource: dict[str, Any] = {"type": rule.resource}
        if rule.resource != "cluster":
            resource.update(name=rule.name, patternType=rule.pattern)
        out.append({"resource": resource, "operations": list(rule.operations), "host": "*"})
    return out


def kafka_acls(service: str) -> list[Any]:
    """The rules as kafka-python ACLs for `KafkaAdminClient.create_acls` (allow, any host)."""
    from kafka.admin import ACL, ACLOperation, ACLPermissionType, ACLResourcePatternType, ResourcePattern, ResourceType

    types = {
        "topic": ResourceType.TOPIC,
        "group": ResourceType.GROUP,
        "transactionalId": ResourceType.TRANSACTIONAL_ID,
        "cluster": ResourceType.CLUSTER,
    }
    patterns = {"literal": ACLResourcePatternType.LITERAL, "prefix": ACLResourcePatternType.PREFIXED}
    principal = f"User:{username(service)}"
    acls = []
    for rule in SERVICE_ACLS[service]:
        name = "kafka-cluster" if rule.resource == "cluster" else rule.name
        pattern = ResourcePattern(types[rule.resource], name, patterns[rule.pattern])
        for op in rule.operations:
            operation = ACLOperation[re.sub(r"(?<!^)(?=[A-Z])", "_", op).upper()]
            acls.append(ACL(principal, "*", operation, ACLPermissionType.ALLOW, pattern))
    return acls
