"""Load YAML into pydantic models with errors that name the file, line and field.

PyYAML's composer keeps the position of every node; pydantic reports the path of every
invalid field. Walking the node tree along that path gives the line to blame.

The files are strict before any schema sees them, because these files decide what is
trusted and PyYAML's defaults would quietly loosen them: a key given twice is an error
(PyYAML keeps the last, so a second ``allow_debug: true`` would win), an explicit null
is an error (``mrtd: null`` would read as "no expected value", i.e. any), and so are
merge keys (``<<``: what a reviewer reads is then not what the file means).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from tdxvm.errors import TdxvmError

M = TypeVar("M", bound=BaseModel)


class _Loader(yaml.SafeLoader):
    """SafeLoader that keeps numbers and booleans as text; the schema converts each value
    to its field's type.

    Without this, ``mr_config_id: 000…0`` would become the integer 0 and lose its width,
    a hex value of digits only would silently change meaning, ``vcpus: true`` would be
    one vCPU, and ``name: no`` (YAML 1.1's false) no name at all.
    """


_Loader.yaml_implicit_resolvers = {
    first: [
        (tag, rx)
        for tag, rx in resolvers
        if tag
        not in (
            "tag:yaml.org,2002:int",
            "tag:yaml.org,2002:float",
            "tag:yaml.org,2002:timestamp",
            "tag:yaml.org,2002:bool",
        )
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


class SpecError(TdxvmError):
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


_NULL = "tag:yaml.org,2002:null"
_MERGE = "tag:yaml.org,2002:merge"
NULL_VALUE = "null is not allowed; remove the key to allow any value"
NULL_ITEM = "null list item"


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _key_identity(loader: _Loader, key: yaml.Node) -> Any:
    """What ``key`` becomes in the loaded mapping (``yes``/``true`` and ``a``/``"a"`` are one key)."""
    if not isinstance(key, yaml.ScalarNode):
        return (id(key),)  # a collection as key: the loader refuses it (unhashable)
    try:
        value = loader.construct_object(key)
        hash(value)
    except (yaml.YAMLError, ValueError, TypeError, OverflowError):
        return (key.tag, key.value)
    return (type(value).__name__, value)


def _strict_problems(root: yaml.Node | None) -> list[tuple[int | None, str, str]]:
    """Duplicate keys, explicit nulls and merge keys anywhere under ``root``, sorted by line.

    A document that is only ``null`` (or ``~``) is an empty document, not a problem. A
    node shared through an alias is walked once, where the document first reaches it.
    """
    problems: list[tuple[int | None, str, str]] = []
    if root is None or (isinstance(root, yaml.ScalarNode) and root.tag == _NULL):
        return problems
    loader = _Loader("")
    seen: set[int] = set()
    todo: list[tuple[yaml.Node, tuple[str, ...]]] = [(root, ())]
    while todo:
        node, path = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        children: list[tuple[yaml.Node, tuple[str, ...]]] = []
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.tag == _MERGE:
                    problems.append((_line(key), ".".join(path), "merge keys (<<) are not allowed; write the keys out"))
                    continue
                name = str(key.value) if isinstance(key, yaml.ScalarNode) else "?"
                field = ".".join((*path, name))
                if isinstance(key, yaml.ScalarNode) and key.tag == _NULL:
                    problems.append((_line(key), field, "a null key is not allowed"))
                ident = _key_identity(loader, key)
                if ident in first:
                    problems.append((_line(key), field, f"duplicate key (first at line {first[ident]})"))
                else:
                    first[ident] = _line(key)
                if isinstance(value, yaml.ScalarNode) and value.tag == _NULL:
                    problems.append((_line(key), field, NULL_VALUE))  # "key:" has no value node to point at
                else:
                    children.append((value, (*path, name)))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                if isinstance(item, yaml.ScalarNode) and item.tag == _NULL:
                    problems.append((_line(item), ".".join((*path, str(i))), NULL_ITEM))
                else:
                    children.append((item, (*path, str(i))))
        todo.extend(reversed(children))  # depth first, in document order
    problems.sort(key=lambda p: p[0] or 0)  # stable: document order within a line
    return problems


def parse_yaml(text: str, model: type[M], *, source: str) -> M:
    """Parse YAML ``text`` into ``model``; raise :class:`SpecError` naming ``source``."""
    try:
        root = yaml.compose(text, Loader=_Loader)
        strict = _strict_problems(root)
        data = None if strict else yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(source, [(line, "", f"not valid YAML: {problem}")]) from None
    if strict:
        raise SpecError(source, strict)
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
