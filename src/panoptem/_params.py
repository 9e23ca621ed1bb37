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

import numpy as np

from panoptem.errors import PanoptemError

__all__ = ["ParamInfo", "param", "param_info", "as_whole", "whole_count", "divisor_count"]

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


def as_whole(value) -> int | None:
    """``value`` as an int where it is a whole number (whole-number floats such as 500.0
    too), else None: fractions, booleans, NaN, infinity, text, None."""
    try:
        if isinstance(value, (bool, np.bool_)) or int(value) != value:
            return None
    except (TypeError, ValueError, OverflowError):
        return None
    return int(value)


def whole_count(name: str, value, hi: int | None = None, lo: int = 0) -> int:
    """``value`` as an int from ``lo`` (to ``hi``), see :func:`as_whole`.

    Raises PanoptemError naming ``name`` and the allowed range otherwise."""
    n = as_whole(value)
    if n is None or n < lo or (hi is not None and n > hi):
        raise PanoptemError(f"{name} must be a whole number from {lo}{'' if hi is None else f' to {hi}'}; "
                            f"got {value!r}.")
    return n


def divisor_count(label: str, value) -> int:
    """A "Max objects per class" value as an int: 0 (objects numbered 1..N) or from 2.

    Raises PanoptemError naming ``label`` otherwise."""
    n = as_whole(value)
    if n is None or n < 0 or n == 1:
        raise PanoptemError(f"{label} must be 0 (number the objects 1..N) or a whole number >= 2 "
                            f"(e.g. 10000); got {value!r}.")
    return n
