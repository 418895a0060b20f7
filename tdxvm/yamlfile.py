"""Load YAML into pydantic models with errors that name the file, line and field.

PyYAML's composer keeps the position of every node; pydantic reports the path of every
invalid field. Walking the node tree along that path gives the line to blame.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class _Loader(yaml.SafeLoader):
    """SafeLoader that keeps numbers as text; the schema converts what should be numbers.

    Without this, ``mr_config_id: 000…0`` would become the integer 0 and lose its width,
    and a hex value of digits only would silently change meaning.
    """


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


class SpecError(Exception):
    """A YAML file that does not fit its schema. ``str()`` is one line per problem."""

    code = "spec"

    def __init__(self, source: str, problems: list[tuple[int | None, str, str]]) -> None:
        self.source = source
        self.problems = problems
        lines = []
        for line, field, message in problems:
            where = f"{source}:{line}" if line is not None else source
            lines.append(f"{where}: {field}: {message}" if field else f"{where}: {message}")
        super().__init__("\n".join(lines))


def _node_at(node: yaml.Node | None, loc: tuple[Any, ...]) -> yaml.Node | None:
    """The deepest node along ``loc`` (keys and list indexes) that exists."""
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            nxt = None
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                    nxt = value
                    break
            if nxt is None:
                return node
            node = nxt
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            return node
    return node


def _key_node(node: yaml.Node | None, loc: tuple[Any, ...]) -> yaml.Node | None:
    """For an unknown key, the key node itself (its line is where the typo is)."""
    parent = _node_at(node, loc[:-1])
    if isinstance(parent, yaml.MappingNode):
        for key, _ in parent.value:
            if isinstance(key, yaml.ScalarNode) and key.value == str(loc[-1]):
                return key
    return parent


def parse_yaml(text: str, model: type[M], *, source: str) -> M:
    """Parse YAML ``text`` into ``model``; raise :class:`SpecError` naming ``source``."""
    try:
        root = yaml.compose(text, Loader=_Loader)
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(source, [(line, "", f"not valid YAML: {problem}")]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(source, [(1, "", "expected a mapping of keys to values at the top level")])
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            node = _key_node(root, loc) if err["type"] == "extra_forbidden" else _node_at(root, loc)
            line = node.start_mark.line + 1 if node is not None else None
            field = ".".join(str(p) for p in loc)
            message = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
            problems.append((line, field, message))
        problems.sort(key=lambda p: (p[0] is None, p[0] or 0))
        raise SpecError(source, problems) from None


def load_yaml(path: str | Path, model: type[M]) -> M:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(str(p), [(None, "", f"cannot read: {exc}")]) from None
    return parse_yaml(text, model, source=str(p))
