"""PointRend's first point-head layer applied before sampling, in a frozen TorchScript graph.

PointRend refines the most uncertain points of the upsampled logits with a small MLP (1-D
convolutions with kernel 1). Its input is the decoder features sampled at the points,
concatenated with the coarse logits there. The first layer's weights on the features,
``W_f``, act linearly, and so does grid sampling (for every mode and padding, each output
is a fixed combination of input pixels, the same for every channel):
``W_f sample(F) == sample(W_f F)``. Where the feature map has fewer pixels than there are
points to refine, :func:`rewrite_point_heads` makes the first layer apply ``W_f`` to the map
(a 1 x 1 convolution) and sample the result, and add the coarse logits' part on its own.
Elsewhere the file's own layer runs; the choice is made per call, from the sizes.

An ortho-plane slice of 64 x 256 has a 16 x 64 map for 4096 and then 8192 points, so its
first layer does about an eighth of the work. The outputs equal the file's to float32
rounding (about 1e-5 on the logits).

The pattern is the point head of empanada's ``StandardPointHead`` as scripted in the
released MitoNet files and in panoptem's own exports (``num_fc`` 3, the coarse prediction at
every layer, ``point_sample`` on 3-D coordinates). A graph without it, or with a 1-D
convolution that is not point-wise, computes what it did.

On CPUs where the model's convolutions become channels-last oneDNN ones
(:mod:`panoptem._conv_graph`), ``rewrite_point_heads(rows=True)`` replaces the head by
:mod:`panoptem._point_rows`' instead: the same projection, on points as rows.

On CPU, :func:`onednn_point_convolutions` also makes the point head's 1-D convolutions
oneDNN 2-D ones. torch sends a 1 x 1 convolution on one thread to its own kernel, which ran
these layers (8192 points) 2x slower than oneDNN; the 3D modes run two slices at a time
with one thread each. With more threads torch already uses oneDNN for them.

Under bfloat16 autocast on a GPU, the upsampled logits stay float32 (CUDA's autocast keeps
bilinear resizing in float32) while the point head returns bfloat16, and the scatter that
writes the refined points back refuses two dtypes. :func:`scatter_into_own_dtype` casts
what is scattered to the target's dtype, a no-op in float32.
"""

from __future__ import annotations

from typing import Any

from panoptem._jit_graph import cast, constant, walk

__all__ = ["rewrite_point_heads", "onednn_point_convolutions", "scatter_into_own_dtype"]

_FIRST_LAYER = """
  %l0 : Tensor[] = prim::ListConstruct(%fine, %coarse)
  %x0 : Tensor = aten::cat(%l0, %dim)
  %y0 : Tensor = aten::conv1d(%x0, %w0, %b0, %s, %p, %s, %g)"""


def _layer(i: int, weight: str, bias: str, out: str) -> str:
    """Layer ``i`` >= 1: ReLU of the previous layer, the coarse logits appended, conv1d."""
    return f"""
  %r{i - 1} : Tensor = aten::relu_(%y{i - 1})
  %l{i} : Tensor[] = prim::ListConstruct(%r{i - 1}, %coarse)
  %x{i} : Tensor = aten::cat(%l{i}, %dim)
  %{out} : Tensor = aten::conv1d(%x{i}, %{weight}, %{bias}, %s, %p, %s, %g)"""


# layers 1 and 2 and the predictor: the same in the pattern and its replacement
_LATER_LAYERS = (_layer(1, "w1", "b1", "y1") + _layer(2, "w2", "b2", "y2")
                 + _layer(3, "wp", "bp", "out") + "\n  return (%out)\n")

_INPUTS = ("%features, %grid, %mode, %pad, %ac, %sq, %coarse, %dim, "
           "%w0, %b0, %w1, %b1, %w2, %b2, %wp, %bp, %s, %p, %g")

# the fine-grained features sampled at the points (point_sample with 3-D coordinates), then
# the head
_PATTERN = f"""
graph({_INPUTS}):
  %smp : Tensor = aten::grid_sampler(%features, %grid, %mode, %pad, %ac)
  %fine : Tensor = aten::squeeze(%smp, %sq){_FIRST_LAYER}{_LATER_LAYERS}"""


# the first layer: projected, then sampled, where the feature map has fewer pixels than there
# are points; otherwise the file's own concatenation and convolution
_REPLACEMENT = f"""
graph({_INPUTS}):
  %zero : int = prim::Constant[value=0]()
  %one : int = prim::Constant[value=1]()
  %two : int = prim::Constant[value=2]()
  %three : int = prim::Constant[value=3]()
  %none : NoneType = prim::Constant()
  %fh : int = aten::size(%features, %two)
  %fw : int = aten::size(%features, %three)
  %pixels : int = aten::mul(%fh, %fw)
  %points : int = aten::size(%grid, %one)
  %project_first : bool = aten::lt(%pixels, %points)
  %y0 : Tensor = prim::If(%project_first)
    block0():
      %fc : int = aten::size(%w0, %zero)
      %fcc : int = aten::size(%w1, %one)
      %c : int = aten::sub(%fcc, %fc)
      %negc : int = aten::neg(%c)
      %wf : Tensor = aten::slice(%w0, %one, %zero, %negc, %one)
      %wc : Tensor = aten::slice(%w0, %one, %negc, %none, %one)
      %wf2v : Tensor = aten::unsqueeze(%wf, %three)
      %wf2 : Tensor = aten::contiguous(%wf2v, %zero)
      %wcc : Tensor = aten::contiguous(%wc, %zero)
      %ones : int[] = prim::ListConstruct(%one, %one)
      %zeros : int[] = prim::ListConstruct(%zero, %zero)
      %proj : Tensor = aten::conv2d(%features, %wf2, %none, %ones, %zeros, %ones, %one)
      %psmp : Tensor = aten::grid_sampler(%proj, %grid, %mode, %pad, %ac)
      %pfine : Tensor = aten::squeeze(%psmp, %sq)
      %cterm : Tensor = aten::conv1d(%coarse, %wcc, %b0, %s, %p, %s, %g)
      %ya : Tensor = aten::add_(%pfine, %cterm, %one)
      -> (%ya)
    block1():
      %smp : Tensor = aten::grid_sampler(%features, %grid, %mode, %pad, %ac)
      %fine : Tensor = aten::squeeze(%smp, %sq)
      %lb : Tensor[] = prim::ListConstruct(%fine, %coarse)
      %xb : Tensor = aten::cat(%lb, %dim)
      %yb : Tensor = aten::conv1d(%xb, %w0, %b0, %s, %p, %s, %g)
      -> (%yb){_LATER_LAYERS}"""


#: oneDNN takes a point-wise 1-D convolution with at least this many input and output
#: channels; smaller ones (a predictor's few outputs, the coarse logits' one input) ran
#: faster in torch's own kernel (1 thread, 8192 points: 257 -> 1 0.14 against 1.2 ms,
#: 1 -> 256 0.26 against 1.0 ms, 65 -> 64 0.8 against 0.7 ms, 161 -> 160 5.2 against 3.1 ms)
ONEDNN_MIN_CHANNELS = 128


def _pointwise_conv1d_only(graph: Any) -> bool:
    """Every ``aten::conv1d`` in ``graph`` has a frozen weight with kernel 1, stride 1, no
    padding, dilation 1 and one group: the only case in which the projection is exact."""
    return all(_pointwise(node) for node in walk(graph.block()) if node.kind() == "aten::conv1d")


def _pointwise(conv1d: Any) -> bool:
    """Whether an ``aten::conv1d`` node has a frozen weight with kernel 1, stride 1, no
    padding, dilation 1 and one group."""
    import torch

    weight, _, stride, padding, dilation, groups = (
        constant(conv1d.inputsAt(i)) for i in range(1, 7))
    return (isinstance(weight, torch.Tensor) and weight.dim() == 3 and weight.shape[2] == 1
            and list(stride or []) == [1] and list(padding or []) == [0]
            and list(dilation or []) == [1] and groups == 1)


def _fold_point_coordinate_rank(graph: Any) -> None:
    """``aten::dim`` of a tensor made by ``aten::zeros``/``empty`` from a list of sizes is
    that list's length: fold it, so that the ``point_coords.dim() == 3`` branches of
    point_sample disappear and the sampling is a straight line the pattern can match."""
    found = []
    for node in walk(graph.block()):
        if node.kind() != "aten::dim":
            continue
        source = node.input().node()
        if (source.kind() in ("aten::zeros", "aten::empty")
                and source.inputsAt(0).node().kind() == "prim::ListConstruct"):
            found.append((node, len(list(source.inputsAt(0).node().inputs()))))
    for node, rank in found:
        graph.setInsertPoint(node)
        node.output().replaceAllUsesWith(graph.insertConstant(rank))
    # leave no insert point on a node that dead-code elimination may remove
    graph.setInsertPoint(graph.block())


def rewrite_point_heads(frozen: Any, rows: bool = False) -> int:
    """Replace the PointRend point heads in ``frozen`` (a module from ``torch.jit.freeze``)
    in place; return how many were replaced. With 0 the graph computes what it did: it is
    untouched if it has no point-wise 1-D convolutions, else at most simplified.

    With ``rows``, the replacement runs the head on points as rows
    (:mod:`panoptem._point_rows`), for CPU float models whose convolutions are then made
    channels-last ones; where a point is sampled otherwise than bilinearly with zeros
    outside (``align_corners=False``), the head is replaced as without ``rows``."""
    import torch

    graph = frozen.graph
    if not _count(graph, "aten::conv1d") or not _pointwise_conv1d_only(graph):
        return 0
    _fold_point_coordinate_rank(graph)
    torch._C._jit_pass_constant_propagation(graph)
    torch._C._jit_pass_dce(graph)
    if rows and _bilinear_zeros_only(graph):
        from panoptem._point_rows import replacement

        before = _count(graph, "aten::embedding_bag")
        torch._C._jit_pass_custom_pattern_based_rewrite_graph(_PATTERN, replacement(), graph)
        # the weights' slices and views, as constants
        torch._C._jit_pass_constant_propagation(graph)
        torch._C._jit_pass_dce(graph)
        return (_count(graph, "aten::embedding_bag") - before) // 2  # one per branch
    before = _count(graph, "aten::grid_sampler")
    torch._C._jit_pass_custom_pattern_based_rewrite_graph(_PATTERN, _REPLACEMENT, graph)
    # split the first layer's weight now, into contiguous constants (oneDNN cannot take
    # views of the weights optimize_for_inference converts)
    torch._C._jit_pass_constant_propagation(graph)
    return _count(graph, "aten::grid_sampler") - before


def _bilinear_zeros_only(graph: Any) -> bool:
    """Every ``aten::grid_sampler`` in ``graph`` samples bilinearly (mode 0), with zeros
    outside (padding 0) and ``align_corners=False``, in constant arguments: the sampling
    that :mod:`panoptem._point_rows` does."""
    return all([constant(node.inputsAt(i)) for i in (2, 3, 4)] == [0, 0, False]
               for node in walk(graph.block()) if node.kind() == "aten::grid_sampler")


def onednn_point_convolutions(frozen: Any, float_inputs: bool = False) -> int:
    """Make the large point-wise 1-D convolutions of ``frozen`` (a module from
    ``torch.jit.freeze``, rewritten or not) oneDNN 2-D convolutions on the points as one
    row, in place; return how many. For CPU float models only (oneDNN's kernel takes float32
    CPU tensors). A convolution with fewer than :data:`ONEDNN_MIN_CHANNELS` input or output
    channels, or whose weight is not a frozen constant, stays as it is.

    With ``float_inputs`` their inputs are cast to float32 first, for a model run under
    bfloat16 autocast (which leaves these calls alone): its point head then runs in float32,
    where torch's bfloat16 1-D convolutions copied each output of 8192 points between
    layouts (MitoNet_v1, one thread: 13 ms per layer)."""
    import torch

    if not torch.backends.mkldnn.is_available():
        return 0
    graph = frozen.graph
    found = []
    for node in walk(graph.block()):
        if node.kind() == "aten::conv1d" and _pointwise(node):
            weight = constant(node.inputsAt(1))
            if min(weight.shape[0], weight.shape[1]) >= ONEDNN_MIN_CHANNELS:
                found.append((node, weight))
    for node, weight in found:
        graph.setInsertPoint(node)
        row = graph.insertConstant(2)
        x = cast(graph, node.inputsAt(0), torch.float32) if float_inputs else node.inputsAt(0)
        x = graph.insertNode(graph.create("aten::unsqueeze", [x, row], 1)).output()
        args = [x, graph.insertConstant(weight.unsqueeze(3).contiguous()), node.inputsAt(2),
                graph.insertConstant([0, 0]), graph.insertConstant([1, 1]),
                graph.insertConstant([1, 1]), graph.insertConstant(1)]
        y = graph.insertNode(graph.create("aten::mkldnn_convolution", args, 1)).output()
        out = graph.insertNode(graph.create("aten::squeeze", [y, row], 1)).output()
        node.output().replaceAllUsesWith(out)
        node.destroy()
    graph.setInsertPoint(graph.block())
    torch._C._jit_pass_dce(graph)  # the 1-D weights
    return len(found)


def scatter_into_own_dtype(module: Any) -> int:
    """Make every ``scatter`` / ``scatter_`` of a tensor in ``module``'s TorchScript methods
    (those of its submodules too, so a module that could not be frozen is covered) cast the
    scattered values to the target's dtype first (``aten::type_as``), in place; return how
    many. The outputs in float32 are unchanged."""
    import torch

    tensor = torch._C.TensorType.get()
    count = 0
    for sub in module.modules():
        for name in sub._c._method_names():
            graph = sub._c._get_method(name).graph
            found = [node for node in walk(graph.block())
                     if node.kind() in ("aten::scatter", "aten::scatter_") and node.inputsSize() == 4
                     and node.inputsAt(3).type().isSubtypeOf(tensor)]
            for node in found:
                cast = graph.create("aten::type_as", [node.inputsAt(3), node.inputsAt(0)], 1)
                cast.insertBefore(node)
                cast.output().setType(node.inputsAt(3).type())
                node.replaceInput(3, cast.output())
            count += len(found)
    return count


def _count(graph: Any, kind: str) -> int:
    return sum(node.kind() == kind for node in walk(graph.block()))
