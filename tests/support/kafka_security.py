"""Kafka security for tests: a throwaway CA and broker certificate (made with `cryptography`),
and the Kafka settings a rendered chart pod would load."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tuneloop.common.kafka import KafkaSettings


@dataclass(frozen=True)
class TlsFiles:
    cafile: Path
    certfile: Path
    keyfile: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_tls(folder: Path, host: str = "127.0.0.1") -> TlsFiles:
    """A CA, and a server certificate it signed for `host` (an IP SAN, or a DNS SAN for a name)."""
    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("tuneloop test CA"))
        .issuer_name(_name("tuneloop test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    try:
        san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        san = x509.DNSName(host)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(host))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([san]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(folder / "ca.crt", folder / "broker.crt", folder / "broker.key")
    files.cafile.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    # Kafka's PEM key store reads PKCS#8 keys only.
    files.keyfile.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    files.keyfile.chmod(0o600)
    return files


def kafka_env_of(pod_spec: dict[str, Any], secrets: Mapping[str, Mapping[str, str]], root: Path) -> dict[str, str]:
    """The TUNELOOP_KAFKA_* variables a rendered pod's first container gets, as the kubelet would
    give them: secretKeyRefs read from `secrets` (name -> key -> value), and Secret volumes
    written under `root`, so paths into those mounts are `root` + the path in the pod."""
    c = pod_spec["containers"][0]
    volumes = {v["name"]: v for v in pod_spec.get("volumes") or []}
    mounts = {}
    for mount in c.get("volumeMounts") or []:
        volume = volumes[mount["name"]]
        # Only the Secrets given; others (API keys, ...) are none of Kafka's business.
        if "secret" in volume and volume["secret"]["secretName"] in secrets:
            data = secrets[volume["secret"]["secretName"]]
            items = volume["secret"].get("items") or [{"key": k, "path": k} for k in data]
            folder = root / mount["mountPath"].lstrip("/")
            for item in items:
                (folder / item["path"]).parent.mkdir(parents=True, exist_ok=True)
                (folder / item["path"]).write_text(data[item["key"]])
            mounts[mount["mountPath"].rstrip("/") + "/"] = folder
    env = {}
    for var in c.get("env") or []:
        if not var["name"].startswith("TUNELOOP_KAFKA_"):
            continue
        if "valueFrom" in var:
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = secrets[ref["name"]][ref["key"]]
            continue
        value = var["value"]
        for prefix, folder in mounts.items():
            if value.startswith(prefix):
                value = str(folder / value[len(prefix):])
        env[var["name"]] = value
    return env


def settings_from_env(env: Mapping[str, str]) -> KafkaSettings:
    """KafkaSettings as a process with exactly these TUNELOOP_KAFKA_* variables loads them."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TUNELOOP_KAFKA_")}
    with mock.patch.dict(os.environ, {**clean, **env}, clear=True):
        return KafkaSettings()
