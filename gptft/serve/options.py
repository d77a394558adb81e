"""The limits and names of a server: ``gptft serve``'s flags (no web imports here)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServeOptions:
    """The limits and names of a server (``gptft serve`` flags)."""

    model_name: str
    api_key: str | None = None
    max_batch: int = 16
    max_new_tokens: int = 256
    max_queue: int = 256
    timeout: float = 600.0
    max_body_bytes: int = 1 << 20

    def problems(self) -> list[str]:
        out = [f"{name}: must be > 0 (got {getattr(self, name)})"
               for name in ("max_batch", "max_new_tokens", "max_queue", "timeout", "max_body_bytes")
               if getattr(self, name) <= 0]
        if not self.model_name:
            out.append("model_name: must not be empty")
        return out
