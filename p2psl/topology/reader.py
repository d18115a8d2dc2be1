"""Reading typed keys from TOML tables, recording every problem instead of stopping at the first."""

from __future__ import annotations

import math
from typing import Any


def table_of(raw: dict, key: str, problems: list[str]) -> dict:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        problems.append(f"[{key}] must be a table")
        return {}
    return value


def array_of(raw: dict, key: str, problems: list[str]) -> list[dict]:
    value = raw.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        problems.append(f"[[{key}]] must be an array of tables (write [[{key}]] before each entry)")
        return []
    return value


class TableReader:
    """Reads typed keys from one table, recording a problem for each bad one."""

    def __init__(self, table: dict, where: str, problems: list[str], known: set[str]):
        self.table, self.where, self.problems = table, where, problems
        for key in sorted(set(table) - known):
            hint = close_match(key, known)
            problems.append(f"{where}: unknown key {key!r}{hint}")

    def bad(self, key: str, message: str) -> None:
        self.problems.append(f"{self.where}.{key}: {message}")

    def get(self, key: str, kind: type | tuple, default: Any, check=None, message: str = "") -> Any:
        if key not in self.table:
            return default
        value = self.table[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            names = " or ".join("number" if k is float else k.__name__ for k in kinds)
            self.bad(key, f"expected {names.replace('str', 'a string').replace('int', 'an integer')}, got {value!r}")
            return default
        if isinstance(value, float) and not math.isfinite(value):  # TOML has inf and nan
            self.bad(key, f"must be a finite number, got {value!r}")
            return default
        if check is not None and not check(value):
            self.bad(key, f"{message}, got {value!r}")
            return default
        return value

    def parsed(self, key: str, parser, default: Any) -> Any:
        if key not in self.table:
            return default
        try:
            return parser(self.table[key])
        except ValueError as exc:
            self.bad(key, str(exc))
            return default


def close_match(key: str, known: set[str]) -> str:
    import difflib

    match = difflib.get_close_matches(key, sorted(known), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""

