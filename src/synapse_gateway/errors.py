"""The gateway's exceptions and the one place that renders them as OpenAI error envelopes."""

from __future__ import annotations

import orjson
from aiohttp import web


class GatewayError(Exception):
    """An error answered to the client with the OpenAI envelope and `status`."""

    status = 500
    error_type = "api_error"
    code = "internal_error"
    # Whether another deployment may still be tried: failures of one backend are, client mistakes are not.
    retryable = False

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after: int | None = None, repeatable: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.retry_after = retry_after
        # Whether the same deployment may be tried again: only when the request never reached it.
        self.repeatable = repeatable
        self.headers: dict[str, str] = {}  # sent with the error (rate-limit state, for one)

    def envelope(self) -> dict[str, dict[str, str | None]]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param,
                          "code": self.code}}


class InvalidRequest(GatewayError):
    status, error_type, code = 400, "invalid_request_error", "invalid_request"


class ModelNotFound(GatewayError):
    status, error_type, code = 404, "invalid_request_error", "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(f"The model `{model}` does not exist or is not served by this gateway; "
                         "GET /v1/models lists the available models.", param="model")


class NotFound(GatewayError):
    status, error_type, code = 404, "invalid_request_error", "not_found"


class MethodNotAllowed(GatewayError):
    status, error_type, code = 405, "invalid_request_error", "method_not_allowed"


class Unauthorized(GatewayError):
    status, error_type, code = 401, "invalid_request_error", "invalid_api_key"


class Forbidden(GatewayError):
    status, error_type, code = 403, "invalid_request_error", "forbidden"


class ModelNotAllowed(Forbidden):
    code = "model_not_allowed"

    def __init__(self, model: str) -> None:
        super().__init__(f"this API key may not use the model `{model}`; GET /v1/models lists the models it may use",
                         param="model")


class RateLimited(GatewayError):
    """A key's own limit (requests, tokens, parallel requests) or budget: retry after `retry_after` seconds."""

    status, error_type, code = 429, "rate_limit_error", "rate_limit_exceeded"


class Conflict(GatewayError):
    """The action cannot be done now (a unit with requests in flight cannot be put to sleep)."""

    status, error_type, code = 409, "invalid_request_error", "backend_busy"


class RequestTimeout(GatewayError):
    status, error_type, code = 408, "invalid_request_error", "request_timeout"


class PayloadTooLarge(GatewayError):
    status, error_type, code = 413, "invalid_request_error", "request_too_large"


class BackendUnavailable(GatewayError):
    status, error_type, code = 503, "api_error", "backend_unavailable"
    retryable = True

    def __init__(self, message: str, *, retry_after: int = 5, code: str | None = None,
                 repeatable: bool = False) -> None:
        super().__init__(message, retry_after=retry_after, code=code, repeatable=repeatable)


class DatabaseUnavailable(GatewayError):
    """The state database (keys, usage) cannot be reached: a key cannot be written or usage read now."""

    status, error_type, code = 503, "api_error", "database_unavailable"

    def __init__(self, message: str) -> None:
        super().__init__(message, retry_after=5)


class BackendTimeout(GatewayError):
    status, error_type, code = 504, "api_error", "backend_timeout"
    retryable = True


class BadGateway(GatewayError):
    status, error_type, code = 502, "api_error", "bad_gateway"
    retryable = True


class BackendClosed(BadGateway):
    """A backend closed the connection before it answered anything: an idle keep-alive connection it
    was closing as the request arrived, or an engine that sheds load by closing (llama.cpp's server
    does when its queue is full). Worth one more try on the same deployment, not more: an engine
    that crashes on this very request must not be sent it again and again."""

    code = "backend_closed"


class BackendRateLimited(GatewayError):
    """A backend answered 429: another deployment may have room; the last one's Retry-After is kept."""

    status, error_type, code = 429, "rate_limit_error", "backend_rate_limited"
    retryable = True


class BackendRejected(GatewayError):
    """A backend's 4xx without an OpenAI envelope: the client's request was refused, with the backend's status."""

    error_type, code = "invalid_request_error", "upstream_error"

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


class InternalError(GatewayError):
    status, error_type, code = 500, "api_error", "internal_error"

    def __init__(self, request_id: str) -> None:
        super().__init__(f"internal error (request id {request_id})")


def error_response(error: GatewayError, headers: dict[str, str] | None = None) -> web.Response:
    """The HTTP response for `error`: the envelope, its status, and Retry-After where it applies."""
    response = web.Response(body=orjson.dumps(error.envelope()), status=error.status,
                            content_type="application/json", headers=headers)
    if error.headers:
        response.headers.update(error.headers)
    if error.retry_after is not None:
        response.headers["Retry-After"] = str(error.retry_after)
    return response


def error_event(error: GatewayError) -> bytes:
    """The final SSE event that ends a stream which failed after its first byte."""
    return b"data: " + orjson.dumps(error.envelope()) + b"\n\n"
