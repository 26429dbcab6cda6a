"""API errors: one exception type that renders as a JSON error naming the field and, for items, the index."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class FieldError:
    field: str
    message: str
    index: int | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"field": self.field, "message": self.message}
        if self.index is not None:
            out["index"] = self.index
        return out


@dataclass
class ApiError(Exception):
    status: int
    message: str
    errors: list[FieldError] = field(default_factory=list)
    headers: dict[str, str] | None = None

    def body(self) -> dict[str, Any]:
        return {"detail": self.message, "errors": [e.as_dict() for e in self.errors]}


def invalid(errors: list[FieldError], status: int = 422) -> ApiError:
    first = errors[0]
    where = f"items[{first.index}].{first.field}" if first.index is not None else first.field
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return ApiError(status, f"{where}: {first.message}{more}", errors)
