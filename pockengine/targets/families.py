"""The target families, by name: the one table builds, the runtime and the CLI dispatch through.

Adding a family is a module implementing family.Family and a line here; its presets name it
(targets/__init__.py).
"""

from __future__ import annotations

from ..errors import TargetError
from . import aarch64, host
from .cortex_m import family as cortex_m
from .cuda import family as cuda
from .family import Family

FAMILIES: dict[str, Family] = {f.name: f for f in (host.FAMILY, aarch64.FAMILY, cuda.FAMILY, cortex_m.FAMILY)}


def family(of) -> Family:
    """The family of a preset, a manifest (or a program's meta) or a family's name."""
    name = of if isinstance(of, str) else of.get("family", host.FAMILY.name) if isinstance(of, dict) else of.family
    try:
        return FAMILIES[name]
    except KeyError:
        raise TargetError(f"no target family {name!r}: PockEngine builds for {', '.join(FAMILIES)}") from None
