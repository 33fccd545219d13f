"""The gateway's error responses: OpenAI's error shape, and gRPC failures mapped onto HTTP.

Every route module raises `ApiError`; the app turns it into the response.
"""

import logging
import uuid

import grpc

from tuneloop.common.errors import field_of

log = logging.getLogger(__name__)

# gRPC status → (HTTP status, OpenAI error type).
GRPC_TO_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: (422, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (422, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (422, "invalid_request_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    # Only when the HTTP client left first: nobody reads it, but the metrics tell it apart.
    grpc.StatusCode.CANCELLED: (499, "client_closed_request"),
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.headers = status, message, type_, param, headers


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    # OpenAI's error shape, so its clients raise their own exception types.
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# What a client reads when a backend fails on its side: stable text, never the backend's
# own (addresses, exception text). The details go to the log under the request id.
_BACKEND_FAILED = {
    503: "the model backend is unavailable; retry later",
    504: "the model backend did not answer in time; retry later",
    502: "the model backend failed",
}


def from_rpc(err: grpc.RpcError) -> ApiError:
    status, type_ = GRPC_TO_HTTP.get(err.code(), (502, "upstream_error"))
    if status >= 500:
        request_id = uuid.uuid4().hex[:16]
        log.warning("backend call failed", extra={"fields": {"request_id": request_id, "code": err.code().name,
                                                             "details": err.details()}})
        return ApiError(status, f"{_BACKEND_FAILED[status]} (request {request_id})", type_,
                        headers={"X-Request-Id": request_id})
    field = field_of(err) if err.code() == grpc.StatusCode.INVALID_ARGUMENT else None
    return ApiError(status, err.details() or err.code().name, type_, field)
