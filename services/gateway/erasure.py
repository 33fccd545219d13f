"""`POST /v1/erasures`: a lead asks for the erasure of their tenant's data, or of one user's.

The tenant is always the caller's key's, never the body's (a body naming one is refused), and
only a `lead` key may ask. The gateway cannot carry the erasure out: it has no access to
the preference store (the chart mounts the store's volume into the store and, read-only, the
Feedback service only), and an erasure rewrites the tables (store/admin.py). So it answers
501 with the exact command an operator runs, `tuneloop store erase`, for this tenant.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoint's annotations, which
# name the local `lead` dependency.
import shlex
from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, FastAPI
from pydantic import BaseModel, ConfigDict, Field

from tuneloop.gateway.auth import ApiKey
from tuneloop.gateway.errors import ApiError, error_body


class ErasureRequest(BaseModel):
    # `extra="forbid"`: a `tenant` in the body is an error, not silently ignored.
    model_config = ConfigDict(extra="forbid")
    user: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="The end user or annotator (annotator_id) whose judgements and pairs go; "
        "absent: everything of the key's tenant.",
    )


def erase_command(tenant: str, user: str | None) -> str:
    """The operator's command for this erasure, quoted for a POSIX shell."""
    return shlex.join(["tuneloop", "store", "erase", "--tenant", tenant, *(["--user", user] if user else [])])


def mount(app: FastAPI, authed: Callable[[str], Callable[..., ApiKey]]) -> None:
    """Adds the endpoint; `authed` is the gateway's key check for a kind of call (auth.ACCESS)."""
    lead = authed("erase")
    unavailable = {"description": "The gateway cannot erase; the message names the command.",
                   "content": {"application/json": {"example": error_body("…", "not_implemented")}}}

    @app.post("/v1/erasures", tags=["erasure"], responses={501: unavailable})
    async def erasures(body: ErasureRequest, key: Annotated[ApiKey, Depends(lead)]):
        command = erase_command(key.tenant, body.user)
        raise ApiError(
            501,
            f"the gateway has no write access to the preference store; an operator erases this with: {command}",
            "not_implemented",
        )
