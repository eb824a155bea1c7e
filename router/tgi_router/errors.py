"""Errors a client sees, as TGI reports them: `{"error": message, "error_type": type}` with a status."""

from __future__ import annotations


class InferError(Exception):
    """Base of every error answered to a client; subclasses fix the status and type of TGI's
    `InferError` variants, and the constructor can set others (framework errors such as 415)."""

    status = 500
    error_type = "incomplete_generation"

    def __init__(self, message: str, status: int | None = None, error_type: str | None = None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if error_type is not None:
            self.error_type = error_type

    def to_json(self) -> dict:
        return {"error": self.message, "error_type": self.error_type}


class ValidationError(InferError):
    status = 422
    error_type = "validation"

    def __init__(self, detail: str):
        super().__init__(f"Input validation error: {detail}")


class OverloadedError(InferError):
    status = 429
    error_type = "overloaded"

    def __init__(self):
        super().__init__("Model is overloaded")


class GenerationError(InferError):
    status = 424
    error_type = "generation"

    def __init__(self, detail: str):
        super().__init__(f"Request failed during generation: {detail}")


class UnhealthyError(InferError):
    status = 503
    error_type = "healthcheck"

    def __init__(self):
        super().__init__("unhealthy")


class ShuttingDownError(InferError):
    """The server got SIGTERM: it finishes the requests it has and takes no new ones."""

    status = 503
    error_type = "shutting_down"

    def __init__(self):
        super().__init__("Server is shutting down")
