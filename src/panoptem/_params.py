"""How a parameter is shown to users, kept with the parameter itself.

The parameter dataclasses (:class:`~panoptem.inference.engine.Params2D`,
:class:`~panoptem.inference.volume.Params3D`) declare each field with :func:`param`: its
default and, beside it, the original widget's label, range, step and choices. The widgets
build their fields from this and the command line its options and help, so a default or
a range is written once (issue: one source of truth for parameters).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from panoptem.errors import PanoptemError

__all__ = ["ParamInfo", "param", "param_info", "whole_count"]

_KEY = "panoptem"
_UNSET = object()


@dataclass(frozen=True)
class ParamInfo:
    """What users see of one parameter.

    Attributes
    ----------
    name : str
        The dataclass field.
    default : object
        The library and command-line default.
    label : str
        The original widget's label (or check-box text), word for word.
    help : str
        Tooltip and command-line help.
    choices : tuple or None
        The allowed values, for a drop-down.
    min, max, step : number or None
        The widget's range and step.
    widget_default : object
        The widget's starting value; the same as ``default`` except where the original
        widget starts differently from its library (ortho-plane is on in the 3D widget).
    """

    name: str
    default: Any
    label: str
    help: str = ""
    choices: tuple | None = None
    min: float | None = None
    max: float | None = None
    step: float | None = None
    widget_default: Any = None


def param(default, label: str, *, help: str = "", choices=None, min=None, max=None,
          step=None, widget_default=_UNSET):
    """A dataclass field with ``default`` and how the widgets and the CLI show it."""
    meta = dict(label=label, help=help, choices=tuple(choices) if choices else None,
                min=min, max=max, step=step,
                widget_default=default if widget_default is _UNSET else widget_default)
    return dataclasses.field(default=default, metadata={_KEY: meta})


def param_info(cls, name: str) -> ParamInfo:
    """The :class:`ParamInfo` of field ``name`` of the parameter dataclass ``cls``."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return ParamInfo(name=name, default=f.default, **f.metadata[_KEY])
    raise KeyError(f"{cls.__name__} has no parameter {name!r}")


def whole_count(name: str, value, hi: int | None = None) -> int:
    """``value`` as an int from 0 (to ``hi``); whole-number floats such as 500.0 pass.

    Raises PanoptemError naming ``name`` and the allowed range otherwise (fractions,
    negatives, booleans, NaN, infinity, text)."""
    try:
        ok = not isinstance(value, bool) and int(value) == value and 0 <= value
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok or (hi is not None and value > hi):
        raise PanoptemError(f"{name} must be a whole number from 0{'' if hi is None else f' to {hi}'}; "
                            f"got {value!r}.")
    return int(value)
