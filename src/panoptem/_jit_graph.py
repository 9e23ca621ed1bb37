"""Reading frozen TorchScript graphs: the graph rewrites of :mod:`panoptem._point_head_graph`
and :mod:`panoptem._conv_graph` share these."""

from __future__ import annotations

from typing import Any

__all__ = ["walk", "constant"]


def walk(block: Any):
    """Every node of ``block`` and of the blocks nested in its nodes (``prim::If`` branches,
    loops), in order."""
    for node in block.nodes():
        yield node
        for sub in node.blocks():
            yield from walk(sub)


def constant(value: Any) -> Any:
    """The value of a graph value made by ``prim::Constant`` (a frozen weight, an int list),
    else None."""
    node = value.node()
    return node.output().toIValue() if node.kind() == "prim::Constant" else None
