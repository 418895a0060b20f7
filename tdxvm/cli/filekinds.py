"""Which tdxvm YAML file a document is, by its shape, and which command takes it.

Four kinds: a fleet (``tdxvm apply -f``), a VM spec (``tdxvm launch``), an image recipe
(``tdxvm image build``) and an attestation policy (``--policy``, or ``policy:`` in a VM
spec). The top-level keys decide (:func:`kind_of`); nothing is validated here
(:func:`loader` gives the kind's own loader, with its file:line errors).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from tdxvm.errors import TdxvmError

if TYPE_CHECKING:
    from tdxvm.attest.policy import Policy


@dataclass(frozen=True)
class Kind:
    name: str  # "fleet", "vm", "recipe", "policy"
    what: str  # for people: "a fleet"
    command: str  # the command that takes such a file, FILE standing for it


KINDS = {
    "fleet": Kind("fleet", "a fleet", "tdxvm apply -f FILE"),
    "vm": Kind("vm", "a VM spec", "tdxvm launch FILE"),
    "recipe": Kind("recipe", "an image recipe", "tdxvm image build FILE"),
    "policy": Kind("policy", "an attestation policy", "tdxvm verify-quote QUOTE --policy FILE"),
}


def refuse_other_kind(path: str, wanted: str) -> None:
    """Raise :class:`WrongFileKind` when the file at ``path`` is plainly another kind than
    ``wanted`` (say which command takes it); unreadable files are left to the loader."""
    kind = guess(path)
    if kind is not None and kind.name != wanted:
        raise WrongFileKind(
            f"{path} is {kind.what}, not {KINDS[wanted].what}: use `{kind.command.replace('FILE', path)}`"
        )


def load_policy_file(path: str) -> Policy:
    """``--policy FILE``: the policy in it; a VM spec, fleet or recipe given instead is
    named as such (rather than every one of its keys reported unknown)."""
    from tdxvm.attest.policy import load_policy  # pydantic and the policy model: only for a policy file

    refuse_other_kind(path, "policy")
    return load_policy(path)


class WrongFileKind(TdxvmError):
    """A tdxvm YAML file given to a command that takes another kind."""

    code = "usage"


def _fields() -> dict[str, set[str]]:
    from tdxvm.attest.policy import Policy
    from tdxvm.image.recipe import Recipe
    from tdxvm.launch.spec import VmSpec

    return {"vm": set(VmSpec.model_fields), "recipe": set(Recipe.model_fields), "policy": set(Policy.model_fields)}


def kind_of(data: Any) -> Kind | None:
    """The kind of a parsed top-level YAML mapping, or None when its keys do not tell.

    A fleet says so (``apiVersion``, ``kind: Fleet``). Otherwise the kind whose keys the
    document uses and no other kind has (``image``, ``vcpus`` for a VM spec; ``packages``,
    ``disk_size`` for a recipe; ``mrtd`` for a policy): a spec with a typo or a missing
    key is still recognised by the rest. An empty document is an (empty) policy.
    """
    if not isinstance(data, dict):
        return None
    if "apiVersion" in data or data.get("kind") == "Fleet":
        return KINDS["fleet"]
    if not data:
        return KINDS["policy"]
    fields = _fields()
    keys = {str(k) for k in data}
    own = {
        name: keys & (mine - set().union(*(f for other, f in fields.items() if other != name)))
        for name, mine in fields.items()
    }
    told = [name for name, found in own.items() if found]
    return KINDS[told[0]] if len(told) == 1 else None


def guess(path: str | Path) -> Kind | None:
    """The kind of the YAML file at ``path``; None when it cannot be read or parsed (its
    loader reports that, with the line)."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return kind_of({} if data is None else data)  # an empty file: an empty policy (the strict defaults)


def loader(kind: Kind) -> Callable[[str | Path], Any]:
    """The function that loads and validates a file of ``kind`` (errors name file:line)."""
    if kind.name == "fleet":
        from tdxvm.fleet.spec import load_fleet

        return load_fleet
    if kind.name == "vm":
        from tdxvm.launch.spec import load_vm_spec

        return load_vm_spec
    if kind.name == "recipe":
        from tdxvm.image.recipe import load_recipe

        return load_recipe
    from tdxvm.attest.policy import load_policy

    return load_policy


class UnknownFileKind(TdxvmError):
    """A file that is not one of tdxvm's YAML files, or whose keys do not tell which."""

    code = "usage"

    def __init__(self, path: str | Path) -> None:
        from tdxvm.attest.policy import Policy
        from tdxvm.yamlfile import SpecError, load_yaml

        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            data = None
        if not isinstance(data, dict):
            try:  # unreadable, not YAML or not a mapping: the YAML loader's own words, with the line
                load_yaml(path, Policy)
            except SpecError as exc:
                super().__init__(str(exc))
                return
        keys = ", ".join(sorted(str(k) for k in data)) if isinstance(data, dict) else ""
        super().__init__(
            f"{path}: its keys ({keys}) do not tell which of tdxvm's files it is (a VM spec, fleet, "
            "image recipe or attestation policy)"
        )
