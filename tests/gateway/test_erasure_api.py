"""POST /v1/erasures on the gateway, in-process: lead keys only, the tenant always the key's,
and a 501 naming the operator's command (the gateway has no write access to the store)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tuneloop.gateway.app import create_app
from tuneloop.gateway.auth import hash_key
from tuneloop.gateway.settings import GatewaySettings

KEYS = {"acme-lead": ("acme", ["lead"]), "acme-app": ("acme", ["app"]), "acme-annotator": ("acme", ["annotator"]),
        "globex-lead": ("globex", ["lead"])}


@pytest.fixture
def client(tmp_path: Path) -> TestClient:
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps([{"sha256": hash_key(k), "tenant": t, "roles": r, "name": k}
                                for k, (t, r) in KEYS.items()]))
    # No backend is called: the endpoint answers before any gRPC.
    app = create_app(GatewaySettings(api_keys_file=keys, generation_target="127.0.0.1:9",
                                     feedback_target="127.0.0.1:9", api_docs=True))
    with TestClient(app) as c:
        yield c


def post(client: TestClient, key: str | None, body: object) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = client.post("/v1/erasures", json=body, headers=headers)
    return r.status_code, r.json()


def command_of(body: dict) -> list[str]:
    return shlex.split(body["error"]["message"].split("erases this with: ", 1)[1])


def test_lead_gets_the_command_for_their_own_tenant(client: TestClient) -> None:
    status, body = post(client, "acme-lead", {"user": "bob"})
    assert status == 501 and body["error"]["type"] == "not_implemented"
    assert command_of(body) == ["tuneloop", "store", "erase", "--tenant", "acme", "--user", "bob"]
    status, body = post(client, "globex-lead", {})
    assert status == 501 and command_of(body) == ["tuneloop", "store", "erase", "--tenant", "globex"]


def test_user_ids_are_quoted_for_the_shell(client: TestClient) -> None:
    _, body = post(client, "acme-lead", {"user": "o'neil; rm -rf /"})
    assert command_of(body)[-1] == "o'neil; rm -rf /"


@pytest.mark.parametrize("key", ["acme-app", "acme-annotator"])
def test_other_roles_are_refused(client: TestClient, key: str) -> None:
    status, body = post(client, key, {"user": "bob"})
    assert status == 403 and body["error"]["type"] == "permission_error"


def test_no_key_is_401(client: TestClient) -> None:
    assert post(client, None, {})[0] == 401
    assert post(client, "wrong", {})[0] == 401


def test_the_tenant_never_comes_from_the_body(client: TestClient) -> None:
    status, body = post(client, "acme-lead", {"tenant": "globex"})
    assert status == 422 and "tenant" in body["error"]["message"]
    assert post(client, "acme-lead", {"user": ""})[0] == 422


def test_the_endpoint_is_in_the_openapi_spec(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert "501" in spec["paths"]["/v1/erasures"]["post"]["responses"]
