"""Precise gRPC errors: INVALID_ARGUMENT that names the offending field, both in the
message and as a google.rpc.BadRequest detail clients can read without parsing text."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status


class FieldError(ValueError):
    """A request field is invalid; `field` is its path, e.g. "items[2].response"."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def invalid_argument_status(err: FieldError) -> grpc.Status:
    detail = any_pb2.Any()
    detail.Pack(
        error_details_pb2.BadRequest(
            field_violations=[error_details_pb2.BadRequest.FieldViolation(field=err.field, description=err.reason)]
        )
    )
    return rpc_status.to_status(
        status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=str(err), details=[detail])
    )


def abort_invalid(context: grpc.ServicerContext, err: FieldError) -> None:
    """Ends the call with INVALID_ARGUMENT naming the field (raises)."""
    context.abort_with_status(invalid_argument_status(err))


def field_of(error: grpc.RpcError) -> str | None:
    """The offending field named in an INVALID_ARGUMENT error, if any (client side)."""
    status = rpc_status.from_call(error)
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            if bad.field_violations:
                return bad.field_violations[0].field
    return None
