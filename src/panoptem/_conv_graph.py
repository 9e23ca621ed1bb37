"""A frozen float model's convolutions as oneDNN channels-last ones, for CPUs.

``torch.jit.optimize_for_inference`` runs a frozen model's convolutions through oneDNN in
its blocked layout, with weights packed once for a guessed input. On the CPU measured
(AMD EPYC, AVX-512) oneDNN then picks a kernel that wants another packing, and re-orders
the weights on every call: about 34 ms of a 258 ms MitoNet_v1 forward pass at 256 x 256
on one thread, 15 ms of that for the ASPPs' 2048-channel 3 x 3 weights alone.

:func:`channels_last_convolutions` instead makes every ``aten::conv2d`` with frozen
weights a ``mkldnn::_convolution_pointwise`` call, the channels-last oneDNN convolution
that torch's own compiler (Inductor) emits on CPUs, with a following ReLU fused into it:

- Weights of kernels larger than 1 x 1 are packed once, for channels-last input. oneDNN
  chose the same packing for them at every input size tried (a 4 x 16 to a 256 x 256
  map, batches of 1 and 2), so they are never re-ordered.
- 1 x 1 weights stay plain. For those oneDNN's packing depends on the input size, and a
  packed weight that does not fit is re-ordered by a slow generic routine (34-42 ms for
  2048 -> 512, against 0.5 ms from the plain layout).

Activations then stay channels-last (NHWC) between convolutions; other operations take
either layout. The outputs equal the file's to float32 rounding (about 1e-5).

This pays with AVX-512 only (:func:`channels_last_pays`): with oneDNN capped at AVX2
(``ONEDNN_MAX_CPU_ISA=AVX2``) the same MitoNet_v1 ran 1.7-2x slower channels-last than in
the blocked layout (256 x 256, 1 thread: 635-651 against 377-388 ms), and capped at plain
AVX-512 (no bfloat16 or VNNI) 1.2x faster (185-186 against 220-222 ms; 1.15-1.5x on two
64 x 256 slices).
"""

from __future__ import annotations

from typing import Any

from panoptem._jit_graph import cast, constant, walk

__all__ = ["channels_last_convolutions", "channels_last_pays"]

#: the map size weights are packed for (any size gave the same packing for kernels > 1 x 1)
_PACKING_SIZE = 32

_RELU = ("aten::relu", "aten::relu_")


def channels_last_pays() -> bool:
    """Whether this CPU runs :func:`channels_last_convolutions`' kernels faster than the
    blocked layout: where torch finds AVX-512."""
    import torch

    return torch.backends.cpu.get_cpu_capability() == "AVX512"


def _frozen_conv2d(node: Any) -> tuple | None:
    """``(weight, padding, stride, dilation, groups)`` of an ``aten::conv2d`` with a frozen
    float32 CPU weight and constant integer arguments, else None."""
    import torch

    if node.kind() != "aten::conv2d":
        return None
    weight, stride, padding, dilation, groups = (
        constant(node.inputsAt(i)) for i in (1, 3, 4, 5, 6))
    if not (isinstance(weight, torch.Tensor) and weight.dim() == 4
            and weight.dtype == torch.float32 and weight.device.type == "cpu"):
        return None
    if not all(isinstance(v, list) and all(isinstance(i, int) for i in v)
               for v in (stride, padding, dilation)) or not isinstance(groups, int):
        return None  # padding given as "same"/"valid", or arguments computed at run time
    return weight, padding, stride, dilation, groups


def _weight_value(graph: Any, conv: Any, weight: Any, padding, stride, dilation, groups) -> Any:
    """The graph value the converted convolution reads its weight from: a packed oneDNN
    constant for kernels larger than 1 x 1, else the frozen weight ``conv`` reads (a new
    constant where ``weight``, cast to another dtype or not contiguous, is not that one)."""
    import torch

    if weight.shape[2] * weight.shape[3] > 1:
        try:
            packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
                weight.contiguous().to_mkldnn(), padding, stride, dilation, groups,
                [1, weight.shape[1] * groups, _PACKING_SIZE, _PACKING_SIZE])
        except RuntimeError:
            packed = None
        if packed is not None:
            # the node optimize_for_inference holds its packed weights in
            node = graph.create("prim::ConstantMKLDNNTensor")
            node.t_("value", packed)
            node.output().setType(torch._C.TensorType.get())
            return graph.insertNode(node).output()
    if weight.dtype == torch.float32 and weight.is_contiguous():  # the frozen weight itself
        return conv.inputsAt(1)
    return graph.insertConstant(weight.contiguous())


def channels_last_convolutions(frozen: Any, dtype: Any = None) -> int:
    """Make the convolutions of ``frozen`` (a module from ``torch.jit.freeze``, float32, on
    the CPU) oneDNN channels-last ones, in place; return how many. A ReLU that is a
    convolution's only use is fused into it. A convolution whose weight or arguments are
    not frozen constants stays as it is.

    With ``dtype`` ``torch.bfloat16`` the convolutions run in bfloat16, as under
    ``torch.autocast`` (CPU, bfloat16): their inputs are cast to it in the graph, and their
    weights and biases are stored in it, packed once instead of re-ordered on every call.
    """
    import torch

    dtype = torch.float32 if dtype is None else dtype
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"channels-last convolutions run in float32 or bfloat16, not {dtype}")

    if not (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_convolution_pointwise")):
        return 0
    graph = frozen.graph
    found = [(node, args) for node in walk(graph.block())
             if (args := _frozen_conv2d(node)) is not None]
    scalars_type = torch._C.ListType(torch._C.OptionalType(torch._C.NumberType.get()))
    for node, (weight, padding, stride, dilation, groups) in found:
        graph.setInsertPoint(node)
        out = node.output()
        uses = out.uses()
        relu = uses[0].user if len(uses) == 1 and uses[0].user.kind() in _RELU else None
        scalars = graph.create("prim::ListConstruct", 1)
        scalars.output().setType(scalars_type)
        x, bias = node.inputsAt(0), node.inputsAt(2)
        if dtype != torch.float32:
            weight, x = weight.to(dtype), cast(graph, x, dtype)
            frozen_bias = constant(bias)
            if isinstance(frozen_bias, torch.Tensor):
                bias = graph.insertConstant(frozen_bias.to(dtype))
        args = [x, _weight_value(graph, node, weight, padding, stride, dilation, groups),
                bias, graph.insertConstant(padding), graph.insertConstant(stride),
                graph.insertConstant(dilation), graph.insertConstant(groups),
                graph.insertConstant("relu" if relu is not None else "none"),
                graph.insertNode(scalars).output(), graph.insertConstant(None)]
        conv = graph.insertNode(graph.create("mkldnn::_convolution_pointwise", args, 1))
        conv.output().setType(out.type())
        if relu is not None:
            relu.output().replaceAllUsesWith(conv.output())
            relu.destroy()
        out.replaceAllUsesWith(conv.output())
        node.destroy()
    # leave no insert point on a node that dead-code elimination may remove
    graph.setInsertPoint(graph.block())
    torch._C._jit_pass_dce(graph)  # the plain weights of packed convolutions
    return len(found)
