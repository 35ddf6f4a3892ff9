"""One error shape for every HTTP surface: ``{"error": {"type", "code", "message", "param"}}``."""

from __future__ import annotations

from pydantic import BaseModel, ValidationError


class ErrorInfo(BaseModel):
    type: str
    code: str
    message: str
    param: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class NextGPTError(Exception):
    """Base of every error that maps onto the shared error shape.

    Subclasses fix the HTTP status and the error ``type``; ``code`` is a stable machine-readable reason.
    """

    status_code: int = 500
    error_type: str = "internal_error"
    retry_after_s: float | None = None  # sent as Retry-After: when asking again may succeed

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.error_type
        self.param = param
        if retry_after_s is not None:
            self.retry_after_s = retry_after_s

    def to_response(self) -> ErrorResponse:
        return ErrorResponse(
            error=ErrorInfo(type=self.error_type, code=self.code, message=self.message, param=self.param)
        )


class InvalidRequestError(NextGPTError):
    status_code = 400
    error_type = "invalid_request_error"


def invalid_fields(exc: ValidationError, where: str = "", default: str = "request") -> InvalidRequestError:
    """A request's first validation error as our 400, named by the path of its field (``where`` before it: the
    request's place in a larger one), else ``default``; pydantic's "Value error, " in front of our own reasons
    left out."""
    first = exc.errors()[0]
    param = ".".join([where, *(str(p) for p in first["loc"])] if where else [str(p) for p in first["loc"]])
    param = param or default
    reason = str(first["msg"]).removeprefix("Value error, ")
    if first["type"] == "json_invalid" and ("surrogate" in reason or "end of hex escape" in reason):
        reason += _LONE_SURROGATE
    return InvalidRequestError(f"{param}: {reason}", code="invalid_request", param=param)


# The JSON parser's words for a \uD800-\uDFFF escape without its pair ("unexpected end of hex escape") name no
# cause; the usual one is a client that cut its text in the middle of an emoji (JavaScript strings are UTF-16).
_LONE_SURROGATE = (" (a \\u escape between \\uD800 and \\uDFFF must be one of a surrogate pair; a string cut in the "
                   "middle of an emoji leaves one alone)")


class AuthenticationError(NextGPTError):
    status_code = 401
    error_type = "authentication_error"


class PermissionDeniedError(NextGPTError):
    status_code = 403
    error_type = "permission_error"


class NotFoundError(NextGPTError):
    status_code = 404
    error_type = "not_found_error"


class GoneError(NextGPTError):
    """The thing existed but is no longer available (e.g. stream events past the replay window)."""

    status_code = 410
    error_type = "gone_error"


class PayloadTooLargeError(NextGPTError):
    status_code = 413
    error_type = "payload_too_large"


class UnsupportedMediaError(NextGPTError):
    status_code = 415
    error_type = "unsupported_media_type"


class RateLimitError(NextGPTError):
    status_code = 429
    error_type = "rate_limit_error"


class ServiceUnavailableError(NextGPTError):
    status_code = 503
    error_type = "service_unavailable"
    retry_after_s = 1.0  # overloaded, loading, a dependency down: a moment later is the earliest worth a try


class BundleError(NextGPTError):
    """A model bundle is missing a file, has a wrong shape, or contradicts its manifest."""

    status_code = 500
    error_type = "bundle_error"


class ConfigurationError(NextGPTError):
    """Invalid settings, found at start-up."""

    status_code = 500
    error_type = "configuration_error"
