"""Config validation shared by every config dataclass: one error format everywhere,
``<owner>.<field>=<value> is invalid: <what is allowed>``."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, NoReturn, TypeVar

from moe.errors import UserError

T = TypeVar("T")


def fail(owner: str, field: str, value: Any, allowed: str) -> NoReturn:
    raise UserError(f"{owner}.{field}={value!r} is invalid: {allowed}")


def check_int(owner: str, field: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        fail(owner, field, value, f"expected an integer >= {minimum}")


def check_number(owner: str, field: str, value: Any, minimum: float = 0.0, strict: bool = False) -> None:
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
    if bad or value < minimum or (strict and value == minimum):
        fail(owner, field, value, f"expected a finite number {'>' if strict else '>='} {minimum:g}")


def check_choice(owner: str, field: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        fail(owner, field, value, f"expected one of {', '.join(repr(c) for c in choices)}")


def check_bool(owner: str, field: str, value: Any) -> None:
    if not isinstance(value, bool):
        fail(owner, field, value, "expected true or false")


def from_dict(cls: type[T], values: Mapping[str, Any], owner: str | None = None) -> T:
    """``cls(**values)`` for a dataclass; unknown keys raise ``ValueError`` naming them."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(
            f"{owner or cls.__name__}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}"
        )
    return cls(**dict(values))
