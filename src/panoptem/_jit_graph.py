"""Reading and editing frozen TorchScript graphs: the graph rewrites of
:mod:`panoptem._point_head_graph` and :mod:`panoptem._conv_graph` share these."""

from __future__ import annotations

from typing import Any

__all__ = ["walk", "constant", "cast"]


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


def cast(graph: Any, value: Any, dtype: Any) -> Any:
    """``value`` (a tensor in ``graph``) cast to ``dtype`` (float32 or bfloat16) by an
    ``aten::to`` inserted at the graph's insert point; it returns the tensor itself where it
    already has that dtype."""
    import torch

    # aten::to(Tensor self, ScalarType dtype, bool non_blocking, bool copy, MemoryFormat?)
    dtype_code = {torch.float32: 6, torch.bfloat16: 15}[dtype]
    node = graph.create("aten::to", [value, graph.insertConstant(dtype_code),
                                     graph.insertConstant(False), graph.insertConstant(False),
                                     graph.insertConstant(None)], 1)
    node.output().setType(value.type())
    return graph.insertNode(node).output()
