"""A config problem located at a file and line, with a fix the user can apply."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Severity = Literal["error", "warning"]
Path = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class Problem:
    """One finding of the config check."""

    severity: Severity
    message: str
    fix: str = ""
    path: Path = ()
    file: str = ""
    line: int | None = None

    def render(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file or "<config>"
        dotted = ".".join(str(p) for p in self.path)
        text = f"{where}: {self.severity}: {dotted + ': ' if dotted else ''}{self.message}"
        return f"{text}\n    fix: {self.fix}" if self.fix else text


class ConfigError(Exception):
    """The configuration cannot be used; `problems` says where and how to fix it."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        errors = [p for p in problems if p.severity == "error"]
        super().__init__("\n".join(p.render() for p in errors) or "invalid configuration")
