"""Entry-point registries: how npud finds drivers (``npud.drivers``) and targets (``npud.targets``).

A vendor's package declares, in its pyproject.toml::

    [project.entry-points."npud.drivers"]
    my-npu = "my_npu.driver:MyNpuDriver"

and ``pip install`` makes it visible here; npud's own npu-emu is declared the same way.  A
plugin is imported only when something asks for it by name (``load``), never at start, so the
daemon core carries no driver's or compiler's modules it does not use.
"""

from __future__ import annotations

import functools
import tomllib
from importlib import import_module, metadata
from pathlib import Path
from typing import Any


class UnknownPlugin(LookupError):
    """No plugin of that name is installed; the message lists the installed ones."""


def installed(group: str) -> dict[str, str]:
    """``{name: "module:attribute"}`` of the plugins installed in ``group``.

    npud's own plugins are also read from its pyproject.toml when npud runs from a source tree
    whose installed metadata predates them (an editable install made before they were declared):
    the source tree's declaration, not a second list, stays the one place that names them."""
    found = {ep.name: ep.value for ep in metadata.entry_points(group=group)}
    for name, value in _source_tree(group).items():
        found.setdefault(name, value)
    return found


@functools.cache
def _source_tree(group: str) -> dict[str, str]:
    """The entry points of ``group`` that npud's own pyproject.toml declares ({} if npud is not
    running from its source tree)."""
    path = Path(__file__).resolve().parent.parent / "pyproject.toml"
    try:
        project = tomllib.loads(path.read_text())["project"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return {}
    if project.get("name") != "npud":
        return {}
    return dict(project.get("entry-points", {}).get(group, {}))


_loaded: dict[tuple[str, str], Any] = {}


def load(group: str, name: str, what: str) -> Any:
    """The plugin ``name`` of ``group``, imported and (if a class) instantiated once.

    ``what`` names the kind in errors ("driver", "target").  UnknownPlugin names the installed
    ones and how to add one."""
    key = (group, name)
    if key in _loaded:
        return _loaded[key]
    known = installed(group)
    if name not in known:
        raise UnknownPlugin(f"no {what} named {name!r} is installed (installed: "
                            f"{', '.join(sorted(known)) or 'none'}); a {what} is a package that declares "
                            f"an entry point in the {group!r} group (docs/DRIVERS.md)")
    module, _, attr = known[name].partition(":")
    obj = import_module(module.strip())
    for part in attr.strip().split(".") if attr.strip() else ():
        obj = getattr(obj, part)
    if isinstance(obj, type):
        obj = obj()
    _loaded[key] = obj
    return obj
