"""The error a request gets: an HTTP status and OpenAI's error body naming the field at fault."""

from __future__ import annotations


class RequestError(Exception):
    """A request the server refuses: ``{"error": {"message", "type", "param", "code"}}``.

    Args:
        status: the HTTP status (4xx for the client's fault).
        message: one line for people, naming the field and the limit.
        param: the request field at fault (``messages[1].content``), or None.
        code: a short machine-readable code (``invalid_api_key``, ``context_length_exceeded``).
        type: OpenAI's error type.
    """

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}
