"""``--shapes`` of the benchmarks: ``"d,f,E,k;..."`` (the kernels benchmark adds T)."""

from __future__ import annotations

from moe.errors import UserError


def parse_shapes(text: str, fields: str = "d,f,E,k") -> list[tuple[int, ...]]:
    """``"d,f,E,k;..."`` (or the ``fields`` given, E and k always third and fourth) -> tuples of
    positive integers; a ValueError names the bad item."""
    count = len(fields.split(","))
    words = {4: "four", 5: "five"}.get(count, str(count))
    shapes = []
    for item in filter(None, (part.strip() for part in text.split(";"))):
        try:
            shape = tuple(int(value) for value in item.split(","))
        except ValueError:
            shape = ()
        if len(shape) != count or min(shape) < 1:
            raise UserError(f'--shapes: {item!r} is not "{fields}" with {words} positive integers')
        if shape[3] > shape[2]:
            raise UserError(f"--shapes: {item!r} has k={shape[3]} > E={shape[2]} (each token's k experts are distinct)")
        shapes.append(shape)
    if not shapes:
        raise UserError(f'--shapes: no shape given; expected "{fields};..."')
    return shapes
