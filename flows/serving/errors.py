"""Errors of the HTTP feature server: each is an HTTP status with a message for the caller.

ServingError (a FlowError)
├── BadRequestError        400: bad JSON, a missing field, a value of the wrong type, a bad `at`
├── UnauthorizedError      401: the bearer token is missing or wrong
├── NotFoundError          404: no such endpoint, view or service
├── MethodNotAllowedError  405: the endpoint exists, not with that method
└── PayloadTooLargeError   413: more keys or rows than the batch limit, or a body too large
"""

from __future__ import annotations

from flows.errors import FlowError


class ServingError(FlowError):
    """A request the server answers with an error status; the message names value and fix."""

    status = 500
    kind = "internal"


class BadRequestError(ServingError):
    status = 400
    kind = "bad_request"


class UnauthorizedError(ServingError):
    status = 401
    kind = "unauthorized"


class NotFoundError(ServingError):
    status = 404
    kind = "not_found"


class MethodNotAllowedError(ServingError):
    status = 405
    kind = "method_not_allowed"


class PayloadTooLargeError(ServingError):
    status = 413
    kind = "too_large"
