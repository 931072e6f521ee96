"""YAML files read with the line of every key: errors as `PATH:LINE: KEY: message`.

Shared by every configuration file the relay reads (relay.yaml, the pilot file,
the recipients file); relay/config.py validates their contents.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError


@dataclass(frozen=True)
class ConfigIssue:
    path: str
    line: int | None
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else self.path
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class ConfigError(Exception):
    """All problems found in the configuration, one line each."""

    def __init__(self, issues: Iterable[ConfigIssue]):
        self.issues = list(issues)
        super().__init__("\n".join(str(i) for i in self.issues))


@dataclass
class Doc:
    """A YAML document plus the line of every key and list item."""

    path: str
    data: Any
    lines: dict[tuple[Any, ...], int] = field(default_factory=dict)

    def line_of(self, loc: tuple[Any, ...]) -> int | None:
        while True:
            if loc in self.lines:
                return self.lines[loc]
            if not loc:
                return None
            loc = loc[:-1]


def _index(
    node: yaml.Node,
    loc: tuple[Any, ...],
    lines: dict[tuple[Any, ...], int],
    duplicates: list[tuple[tuple[Any, ...], int]],
) -> None:
    """Record the line of every key and item; collect keys repeated in one mapping.

    PyYAML lets a repeated key silently replace the first (a second `pilots:`
    would swap the whole list), so a duplicate is an error, as in Postfix's
    postconf warnings, but fatal here.
    """
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            sub = (*loc, key.value)
            if sub in lines:
                duplicates.append((sub, key.start_mark.line + 1))
            else:
                lines[sub] = key.start_mark.line + 1
            _index(value, sub, lines, duplicates)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            sub = (*loc, i)
            lines[sub] = item.start_mark.line + 1
            _index(item, sub, lines, duplicates)


def read_yaml(path: Path, shown: str) -> Doc:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([ConfigIssue(shown, None, "", "file not found")]) from None
    except OSError as exc:
        raise ConfigError([ConfigIssue(shown, None, "", exc.strerror or str(exc))]) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else None
        raise ConfigError([ConfigIssue(shown, line, "", f"YAML syntax: {exc.problem}")]) from None
    doc = Doc(shown, {} if data is None else data)
    root = (node.start_mark.line + 1) if node is not None else None
    if root:
        doc.lines[()] = root
    if node is not None:
        duplicates: list[tuple[tuple[Any, ...], int]] = []
        _index(node, (), doc.lines, duplicates)
        if duplicates:
            raise ConfigError(
                ConfigIssue(shown, line, dotted(loc), "duplicate key") for loc, line in duplicates
            )
    if not isinstance(doc.data, dict):
        raise ConfigError([ConfigIssue(shown, root, "", "the file must hold a mapping")])
    return doc


def dotted(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc)


def pydantic_issues(doc: Doc, exc: ValidationError) -> list[ConfigIssue]:
    issues = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "literal_error":
            msg = f"unknown value {err['input']!r}; expected {err['ctx']['expected']}"
        elif msg.startswith("Value error, "):
            msg = msg.removeprefix("Value error, ")
        issues.append(ConfigIssue(doc.path, doc.line_of(loc), dotted(loc), msg))
    return issues
