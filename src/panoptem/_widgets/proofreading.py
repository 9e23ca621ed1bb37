"""The proofreading widgets: Merge, Delete, Split, Morph, Filter, Count Labels, Jump to label
and Find next available label.

Each maps its fields onto one call of :mod:`panoptem.proofread`. Points are converted from
world coordinates with both layers' scale and translate. Edits (merge, delete, split, morph)
are computed in a worker and written with ``Labels.data_setitem`` inside one
``block_history``, so Ctrl+Z undoes an edit as one step and Ctrl+Shift+Z redoes it; on a
zarr-backed layer (panoptem's 3D output) the edit goes to the store. Each Labels layer gets
a :class:`~panoptem.proofread.LabelBoxes` (built on its first edit, in the worker) that
napari's paint events keep current, so an edit costs the size of the labels it touches.
Titles, labels, defaults and call buttons are the original's.
"""

from __future__ import annotations

import weakref
from pathlib import Path

import napari
import numpy as np
from magicgui.widgets import FunctionGui, Label
from napari.utils.notifications import show_error, show_info

from panoptem import proofread as pr
from panoptem._files import free_path, writable_folder
from panoptem._widgets import _common
from panoptem._widgets._worker import start_job
from panoptem.errors import PanoptemError

__all__ = [
    "MergeLabels",
    "DeleteLabels",
    "SplitLabels",
    "MorphLabels",
    "FilterLabels",
    "JumpToLabel",
    "NextAvailableLabel",
    "CountLabels",
    "label_boxes",
]

# --------------------------------------------------------------------------------------
# shared: boxes per layer, points, where an edit acts, writing an edit
# --------------------------------------------------------------------------------------
_BOXES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _on_paint(event) -> None:
    layer = event.source
    boxes = _BOXES.get(layer)
    if boxes is None:
        return
    for atom in event.value or []:
        if isinstance(atom, tuple):
            index, _before, after = atom
            boxes.record(index, after)
            continue
        key = getattr(atom, "slice_key", None)
        if key is None:  # an edit we cannot read: build the boxes again on the next edit
            _BOXES.pop(layer, None)
            return
        box = tuple(k if isinstance(k, slice) else slice(int(k), int(k) + 1) for k in key)
        box = tuple(slice(s.start or 0, n if s.stop is None else s.stop) for s, n in zip(box, layer.data.shape, strict=False))
        boxes.record_box(box, np.unique(np.asarray(atom.new_value)).tolist())


def _on_data(event) -> None:
    _BOXES.pop(event.source, None)


def label_boxes(layer) -> pr.LabelBoxes:
    """The layer's :class:`~panoptem.proofread.LabelBoxes`, built on first use (a full pass)."""
    boxes = _BOXES.get(layer)
    if boxes is None or tuple(boxes.shape) != tuple(layer.data.shape):
        boxes = pr.LabelBoxes.of(layer.data)
        if layer not in _BOXES:
            layer.events.paint.connect(_on_paint)
            layer.events.data.connect(_on_data)
        _BOXES[layer] = boxes
    return boxes


def _editable(layer) -> None:
    _common.require(layer is not None, "Choose the labels layer to edit.")
    _common.require(not layer.multiscale, f"'{layer.name}' is multiscale; edit its full-resolution labels.")
    data = layer.data
    _common.require(
        isinstance(data, np.ndarray) or type(data).__module__.split(".")[0] == "zarr",
        f"'{layer.name}' cannot be edited ({type(data).__name__}): load it as a numpy array or a zarr "
        "array (panoptem's 3D output opens as zarr).",
    )
    _common.require(layer.ndim in (2, 3, 4), f"'{layer.name}' has {layer.ndim} dimensions; the tools take 2D, 3D or 4D labels.")


def points_in_labels(points_layer, labels_layer) -> np.ndarray:
    """The points as index coordinates of ``labels_layer`` (scale and translate respected)."""
    if points_layer is None or len(points_layer.data) == 0:
        return np.zeros((0, labels_layer.ndim))
    ndim = labels_layer.ndim
    if points_layer.ndim < ndim:
        raise PanoptemError(
            f"The points layer '{points_layer.name}' has {points_layer.ndim} dimensions but "
            f"'{labels_layer.name}' has {ndim}; put the points in a layer of the labels' dimensions."
        )
    out = []
    for point in np.asarray(points_layer.data, dtype=float):
        world = np.asarray(points_layer.data_to_world(point), dtype=float)[-ndim:]
        out.append(np.asarray(labels_layer.world_to_data(world), dtype=float))
    return np.asarray(out)


def plane_axes(viewer, labels_layer, apply3d: bool) -> tuple[int, ...]:
    """Axes an edit fixes at each point: none in 2D or with "Apply in 3D"; the viewer's
    slicing axis of a 3D volume; the frame axes (or, in 3D, the flipbook axis) of 4D."""
    if labels_layer.ndim == 2:
        return ()
    fixed, _ = _common.layer_axes(viewer, labels_layer)
    if labels_layer.ndim == 3:
        return () if apply3d else (fixed[0],)
    return (fixed[0],) if apply3d else tuple(fixed[:2])


def current_position(viewer, labels_layer) -> np.ndarray:
    """The viewer's position as index coordinates of ``labels_layer`` (rounded, clipped)."""
    offset = viewer.dims.ndim - labels_layer.ndim
    pos = np.asarray(labels_layer.world_to_data(np.asarray(viewer.dims.point)[offset:]), dtype=float)
    return np.clip(np.round(pos), 0, np.asarray(labels_layer.data.shape) - 1).astype(int)


def _need_points(viewer, points_layer, labels_layer, what: str) -> bool:
    """True when there are points; otherwise add a points layer to click them in (the original's way)."""
    if points_layer is not None and len(points_layer.data):
        return True
    if points_layer is None:
        layer = viewer.add_points(ndim=max(labels_layer.ndim, viewer.dims.ndim), name="Points", size=8)
        layer.mode = "add"
        show_info(f"Added the points layer 'Points': click on the labels to {what}, then press the button again.")
    else:
        points_layer.mode = "add"
        show_error(f"'{points_layer.name}' has no points: click on the labels to {what}, then press the button again.")
    return False


def _write(labels_layer, change: pr.Change) -> int:
    """Write ``change`` into the layer as one undoable step; return how many voxels changed."""
    if not change:
        return 0
    shape = labels_layer.data.shape
    if len(change.index) != len(shape) or any(int(i.max()) >= n for i, n in zip(change.index, shape, strict=True)):
        raise PanoptemError(f"'{labels_layer.name}' changed shape during the edit; run it again.")
    with labels_layer.block_history():
        labels_layer.data_setitem(change.index, change.value.astype(labels_layer.data.dtype, copy=False))
    return change.size


def _clear(layer) -> None:
    """Remove the used points (or shapes), as the original does."""
    if layer is not None and len(layer.data):
        layer.data = []


class _EditWidget(FunctionGui):
    """An editing tool: checks the layers, computes the change in a worker, writes it undoably."""

    title = ""
    verb = ""

    def __init__(self, napari_viewer, function, **kwargs) -> None:
        self._viewer = napari_viewer
        super().__init__(function, layout="vertical", **kwargs)

    def _edit(self, labels_layer, compute, used_layers=(), done_text="") -> object:
        """Run ``compute(data, boxes) -> Change`` in a worker and write the change undoably."""
        data = labels_layer.data

        def work(progress):
            progress.stage(self.title, 0)
            boxes = label_boxes(labels_layer)
            return compute(data, boxes)

        def write(change) -> None:
            if labels_layer.data is not data:
                raise PanoptemError(f"'{labels_layer.name}' was replaced during the edit; run it again.")
            n = _write(labels_layer, change)
            for layer in used_layers:
                _clear(layer)
            show_info(f"{done_text} ({n} voxels changed; Ctrl+Z undoes it)." if n else "Nothing changed.")

        return start_job(work, title=self.title, on_done=write)


    def _edit_at_points(self, labels_layer, points_layer, apply3d, what, compute, done_text,
                        check=None):
        """Delete and Split: check the layers (and ``check()``), read the points, run
        ``compute(data, points, plane_axes, boxes, checked)``."""
        try:
            _editable(labels_layer)
            checked = check() if check is not None else None
            if not _need_points(self._viewer, points_layer, labels_layer, what):
                return None
            pts = points_in_labels(points_layer, labels_layer)
            axes = plane_axes(self._viewer, labels_layer, apply3d)
        except PanoptemError as err:
            show_error(str(err))
            return None
        return self._edit(labels_layer, lambda data, boxes: compute(data, pts, axes, boxes, checked),
                          used_layers=[points_layer], done_text=done_text)


def _labels_option(**extra) -> dict:
    return dict(label="labels layer", tooltip="The labels to edit", **extra)


def _points_option() -> dict:
    return dict(label="points layer", nullable=True, tooltip="Points on the labels to act on")


def _apply3d(tooltip: str) -> dict:
    return dict(widget_type="CheckBox", text="Apply in 3D", value=False, tooltip=tooltip)


# --------------------------------------------------------------------------------------
# Merge, Delete, Split, Morph
# --------------------------------------------------------------------------------------
class MergeLabels(_EditWidget):
    """The "Merge Labels" widget: labels under points (and line/path shapes) become one."""

    title = "Merge labels"

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(
            napari_viewer, self.run, call_button="Merge labels", name="merge_labels",
            param_options=dict(
                labels_layer=_labels_option(), points_layer=_points_option(),
                shapes_layer=dict(label="shapes layer", nullable=True,
                                  tooltip="Optional: lines or paths across the labels to merge"),
                apply3d=_apply3d("Check box to merge label in 3D."),
            ),
        )
        self.shapes_layer.value = None

    def run(self, labels_layer: napari.layers.Labels, points_layer: napari.layers.Points,
            shapes_layer: napari.layers.Shapes, apply3d: bool = False):
        viewer = self._viewer
        try:
            _editable(labels_layer)
            pts = points_in_labels(points_layer, labels_layer)
            line_hits = _shape_hits(shapes_layer, labels_layer)
            if not len(pts) and not len(line_hits):
                _need_points(viewer, points_layer, labels_layer, "merge")
                return None
            sites = np.concatenate([pts, line_hits]) if len(line_hits) else pts
            axes = plane_axes(viewer, labels_layer, apply3d)
            target = int(labels_layer.selected_label)
        except PanoptemError as err:
            show_error(str(err))
            return None
        return self._edit(
            labels_layer,
            lambda data, boxes: pr.merge_labels(data, sites, target=target, plane_axes=axes, boxes=boxes),
            used_layers=[layer for layer in (points_layer, shapes_layer) if layer is not None],
            done_text="Merged the labels",
        )


def _shape_hits(shapes_layer, labels_layer) -> np.ndarray:
    """Labelled voxels under the line and path shapes, in the labels' index coordinates."""
    if shapes_layer is None:
        return np.zeros((0, labels_layer.ndim))
    paths = []
    ndim = labels_layer.ndim
    for verts, kind in zip(shapes_layer.data, shapes_layer.shape_type, strict=True):
        if kind not in ("line", "path"):
            continue
        world = [np.asarray(shapes_layer.data_to_world(v), dtype=float)[-ndim:] for v in verts]
        if len(world[0]) < ndim:
            raise PanoptemError(
                f"The shapes layer '{shapes_layer.name}' has fewer dimensions than '{labels_layer.name}'."
            )
        paths.append(np.array([labels_layer.world_to_data(w) for w in world], dtype=float))
    if not paths:
        return np.zeros((0, ndim))
    return pr.ids_along_paths(labels_layer.data, paths).astype(float)


class DeleteLabels(_EditWidget):
    """The "Delete Labels" widget: labels under the points become background."""

    title = "Delete labels"

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(
            napari_viewer, self.run, call_button="Delete labels", name="delete_labels",
            param_options=dict(
                labels_layer=_labels_option(), points_layer=_points_option(),
                apply3d=_apply3d("Check box to delete label in 3D."),
            ),
        )

    def run(self, labels_layer: napari.layers.Labels, points_layer: napari.layers.Points,
            apply3d: bool = False):
        return self._edit_at_points(
            labels_layer, points_layer, apply3d, "delete",
            lambda data, pts, axes, boxes, _: pr.delete_labels(data, pts, plane_axes=axes, boxes=boxes),
            done_text="Deleted the labels")


class SplitLabels(_EditWidget):
    """The "Split Labels" widget: a watershed split into new labels unused in the volume."""

    title = "Split labels"

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(
            napari_viewer, self.run, call_button="Split labels", name="split_labels",
            param_options=dict(
                labels_layer=_labels_option(), points_layer=_points_option(),
                min_distance=dict(widget_type="Slider", label="Minimum Distance", min=1, max=100,
                                  value=10, tooltip="Min Distance between Markers"),
                points_as_markers=dict(widget_type="CheckBox", text="Use points as markers",
                                       value=False, tooltip="Use the points as the watershed's "
                                       "markers (one piece per point); Minimum Distance is ignored."),
                apply3d=_apply3d("Check box to split label in 3D."),
                new_label=dict(widget_type="CheckBox", text="Specify new label IDs (optional)",
                               value=False, tooltip="Choose where the new label IDs start"),
                start_label=dict(widget_type="LineEdit", label="Start new label IDs from:",
                                 value="", tooltip="The label ID to start the new label IDs from."),
            ),
        )

    def run(self, labels_layer: napari.layers.Labels, points_layer: napari.layers.Points,
            min_distance: int = 10, points_as_markers: bool = False, apply3d: bool = False,
            new_label: bool = False, start_label: str = ""):
        def start() -> int | None:
            if not new_label:
                return None
            text = str(start_label).strip()
            _common.require(text.isdigit() and int(text) > 0, "Start new label IDs from must "
                            "be a positive whole number (or untick 'Specify new label IDs').")
            return int(text)

        return self._edit_at_points(
            labels_layer, points_layer, apply3d, "split",
            lambda data, pts, axes, boxes, first: pr.split_labels(
                data, pts, min_distance=int(min_distance), points_as_markers=points_as_markers,
                start_label=first, plane_axes=axes, boxes=boxes),
            done_text="Split the labels", check=start)


class MorphLabels(_EditWidget):
    """The "Morph Labels" widget: dilate, erode, close, open or fill holes."""

    title = "Morph labels"

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(
            napari_viewer, self.run, call_button="Apply", name="morph_labels",
            param_options=dict(
                labels_layer=_labels_option(), points_layer=_points_option(),
                operation=dict(widget_type="ComboBox", choices=list(pr.MORPH_OPERATIONS),
                               value=pr.MORPH_OPERATIONS[0], label="Operation",
                               tooltip="Morphological operation to apply"),
                radius=dict(widget_type="Slider", label="Radius", min=1, max=7, value=1,
                            tooltip="Radius of selem for morphology op."),
                hole_size=dict(widget_type="LineEdit", value="64", label="Hole size",
                               tooltip="Max hole size to fill if op is fill hole"),
                apply3d=_apply3d("Check box to apply the operation in 3D."),
            ),
        )
        self.points_layer.value = None

    def run(self, labels_layer: napari.layers.Labels, points_layer: napari.layers.Points,
            operation: str = "Dilate", radius: int = 1, hole_size: str = "64",
            apply3d: bool = False):
        viewer = self._viewer
        try:
            _editable(labels_layer)
            text = str(hole_size).strip()
            _common.require(text.isdigit() and int(text) > 0, "Hole size must be a positive whole number of pixels.")
            pts = points_in_labels(points_layer, labels_layer)
            axes = plane_axes(viewer, labels_layer, apply3d)
            here = current_position(viewer, labels_layer)
            planes = [tuple(int(here[a]) for a in axes)] if axes else []
        except PanoptemError as err:
            show_error(str(err))
            return None
        which = "the pointed labels" if len(pts) else "every label"
        return self._edit(
            labels_layer,
            lambda data, boxes: pr.morph_labels(
                data, operation, points=pts if len(pts) else None, radius=int(radius),
                hole_size=int(text), plane_axes=axes, planes=planes, boxes=boxes),
            used_layers=[points_layer] if points_layer is not None else [],
            done_text=f"{operation}: {which}",
        )


# --------------------------------------------------------------------------------------
# Filter, Count
# --------------------------------------------------------------------------------------
class FilterLabels(FunctionGui):
    """The "Filter Labels" widget: a copy without small or border-touching labels."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        self._viewer = napari_viewer
        super().__init__(
            self.run, call_button="Remove labels", layout="vertical", name="filter_labels",
            param_options=dict(
                labels_layer=dict(label="labels layer"),
                remove_opt=dict(widget_type="RadioButtons", label="Remove:",
                                choices=["Small labels", "Boundary labels (slow)"], value="Small labels",
                                tooltip="Either remove boundary labels or small pixel labels."),
                min_area=dict(widget_type="SpinBox", label="Minimum pixel/voxel area:", value=100,
                              min=1, max=10_000_000, tooltip="Labels of this area or smaller are removed."),
                apply_to=dict(widget_type="RadioButtons", label="Apply to:", choices=list(pr.FILTER_SCOPES),
                              value=pr.FILTER_SCOPES[0],
                              tooltip="Apply to a single image, a 2D tile stack or a 3D image/z-stack."),
            ),
        )

    def run(self, labels_layer: napari.layers.Labels, remove_opt: str = "Small labels",
            min_area: int = 100, apply_to: str = "Current image"):
        viewer = self._viewer
        try:
            _common.require(labels_layer is not None, "Choose the labels layer to filter.")
            _common.require(labels_layer.ndim in (2, 3), f"'{labels_layer.name}' is {labels_layer.ndim}D; "
                            "Filter Labels takes 2D images and 3D stacks.")
            plane = 0
            if labels_layer.ndim == 3:  # the xy plane shown (filtering takes planes along axis 0)
                if apply_to == "Current image":
                    _common.require(_common.layer_axes(viewer, labels_layer)[0][0] == 0,
                                    "'Current image' filters an xy plane: switch the view back to xy.")
                plane = int(current_position(viewer, labels_layer)[0])
        except PanoptemError as err:
            show_error(str(err))
            return None
        data = labels_layer.data
        border = remove_opt.startswith("Boundary")

        def work(progress):
            progress.stage("filtering", 0)
            return pr.filter_labels(data, min_area=int(min_area), border=border, apply_to=apply_to, plane=plane)

        def show(result) -> None:
            kept, removed = result
            if not removed:
                show_info("No labels were removed.")
                return
            viewer.add_labels(kept, name=f"Labels_removed_{labels_layer.name}",
                              scale=labels_layer.scale, translate=labels_layer.translate)
            print(f"Removed label IDs: {removed}")
            show_info(f"Removed {len(removed)} labels; the result is the new layer "
                      f"'Labels_removed_{labels_layer.name}'.")

        return start_job(work, title="Filter labels", on_done=show)


_COUNT_SCOPES = ["Current image", "2D patches", "3D volume or z-stack"]


class CountLabels(FunctionGui):
    """The "Count Labels" widget: label IDs and voxel counts per class, optionally as CSV."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        self._viewer = napari_viewer
        super().__init__(
            self.run, call_button="Count Label IDs (see terminal)", layout="vertical",
            name="count_labels",
            param_options=dict(
                labels_layer=dict(label="labels layer"),
                label_type=dict(widget_type="RadioButtons", choices=_COUNT_SCOPES, value=_COUNT_SCOPES[0],
                                label="Apply to:", tooltip="Calculate number of instance labels"),
                label_text=dict(widget_type="TextEdit", value="class_number,class_name",
                                label="Define dataset labels:\nFormat: class_number,class_name\nExample: 1,Mito",
                                tooltip="One line per class: {class_number},{class_name}"),
                label_divisor=dict(widget_type="LineEdit", label="Label divisor", value="None",
                                   tooltip="Label divisor that separates objects of different classes."),
                export_csv=dict(widget_type="CheckBox", value=False, label="Export list of label IDs (.csv file)",
                                tooltip="Save the label IDs by class, with their sizes, as a CSV file."),
                folder_name=dict(widget_type="LineEdit", value="", label="Folder name"),
                save_dir=dict(widget_type="FileEdit", value="", label="Save directory", mode="d",
                              tooltip="Directory in which to save the label counts."),
            ),
        )
        head = Label(name="save_op_head", label="<h3>Export Label IDs (optional)</h3>", gui_only=True)
        self.insert(self.index(self.export_csv), head)
        self.last_rows: list[dict] = []

    def run(self, labels_layer: napari.layers.Labels, label_type: str = "Current image",
            label_text: str = "class_number,class_name", label_divisor: str = "None",
            export_csv: bool = False, folder_name: str = "", save_dir: str = ""):
        viewer = self._viewer
        try:
            _common.require(labels_layer is not None, "Choose the labels layer to count.")
            names = pr.parse_class_names(label_text)
            text = str(label_divisor).strip()
            _common.require(text.lower() in ("none", "") or (text.isdigit() and int(text) > 0),
                            "Label divisor must be a positive whole number, or None.")
            divisor = None if text.lower() in ("none", "") else int(text)
            kwargs: dict = {}
            if label_type == "2D patches":
                _common.require(labels_layer.ndim == 3, "'2D patches' needs a stack of 2D images (3D labels).")
                kwargs["per_plane"] = True
            elif label_type == "Current image" and labels_layer.ndim == 3:
                kwargs["plane"] = int(current_position(viewer, labels_layer)[0])
            out_path = None
            if export_csv:
                folder = str(save_dir or "").strip()
                _common.require(folder not in ("", "."), "Choose a Save directory for the CSV file.")
                target = Path(folder) / folder_name.strip() if folder_name.strip() else Path(folder)
                writable_folder(target, "save directory")
                out_path = free_path(target / f"{labels_layer.name}_label_ids.csv")
            rows = pr.count_labels(labels_layer.data, label_divisor=divisor, **kwargs)
        except PanoptemError as err:
            show_error(str(err))
            return None
        self.last_rows = rows
        lines = []
        for cid, ids in pr.labels_per_class(rows).items():
            name = names.get(cid, f"class {cid}")
            lines.append(f"{name}: {len(ids)} label IDs")
            print(f"{name} (class {cid}) label IDs: {ids}")
        summary = "; ".join(lines) if lines else "no labels"
        if out_path is not None:
            out_path.parent.mkdir(parents=True, exist_ok=True)
            pr.write_counts_csv(out_path, rows, names)
            summary += f". Saved {out_path}"
        show_info(f"'{labels_layer.name}': {summary}")
        return rows


# --------------------------------------------------------------------------------------
# Jump to label, Find next available label
# --------------------------------------------------------------------------------------
def _positive_int(text, what: str) -> int:
    text = str(text).strip()
    _common.require(text.isdigit() and int(text) > 0, f"{what} must be a positive whole number, not {text!r}.")
    return int(text)


class JumpToLabel(FunctionGui):
    """The "Jump to label" widget: shows the plane where the label is largest and selects it."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        self._viewer = napari_viewer
        super().__init__(
            self.run, call_button="Jump to label", layout="vertical", name="jump_to_label",
            param_options=dict(
                labels_layer=dict(label="labels layer"),
                label_id=dict(widget_type="LineEdit", label="Label ID", value="1", tooltip="Label to jump to"),
            ),
        )

    def run(self, labels_layer: napari.layers.Labels, label_id: str = "1"):
        viewer = self._viewer
        try:
            _common.require(labels_layer is not None, "Choose the labels layer.")
            label = _positive_int(label_id, "Label ID")
            loc = pr.locate_label(labels_layer.data, label, boxes=label_boxes(labels_layer))
        except PanoptemError as err:
            show_error(f"'{labels_layer.name}': {err}" if labels_layer is not None else str(err))
            return None
        fixed, displayed = _common.layer_axes(viewer, labels_layer)
        point = np.array(loc.centre, dtype=float)
        for a in fixed:
            point[a] = loc.best[a]
        world = np.asarray(labels_layer.data_to_world(point), dtype=float)
        offset = viewer.dims.ndim - labels_layer.ndim
        for a in fixed:
            viewer.dims.set_point(a + offset, world[a])
        camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera  # napari >= 0.9: scene
        camera.center = tuple(world[a] for a in displayed)
        labels_layer.selected_label = label
        viewer.layers.selection.active = labels_layer
        return loc


class NextAvailableLabel(FunctionGui):
    """The "Find next available label" widget: selects the next unused label of a class."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        self._viewer = napari_viewer
        self._queues: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        super().__init__(
            self.run, call_button="Find available label", layout="vertical",
            name="next_available_label",
            param_options=dict(
                labels_layer=dict(label="labels layer"),
                class_id=dict(widget_type="LineEdit", label="Class ID", value="1",
                              tooltip="Class ID for which to find next label"),
                label_divisor=dict(widget_type="LineEdit", label="Label Divisor", value="10000",
                                   tooltip="Label divisor that separates objects of different classes."),
                apply3d=dict(widget_type="CheckBox", text="Labels are 3D", value=False,
                             tooltip="Check box for working with 3D labels."),
                update=dict(widget_type="CheckBox", text="Update labels", value=False,
                            tooltip="Check box to update the list of working labels"),
            ),
        )

    def run(self, labels_layer: napari.layers.Labels, class_id: str = "1",
            label_divisor: str = "10000", apply3d: bool = False, update: bool = False):
        viewer = self._viewer
        try:
            _common.require(labels_layer is not None, "Choose the labels layer.")
            text = str(class_id).strip()
            _common.require(text.isdigit(), f"Class ID must be a whole number, not {text!r}.")
            cid = int(text)
            divisor = _positive_int(label_divisor, "Label Divisor")
            whole = apply3d or labels_layer.ndim == 2
            plane = None
            if not whole:  # the plane the viewer shows (xy, xz or yz; a frame of a 4D stack)
                axes = _common.layer_axes(viewer, labels_layer)[0]
                here = current_position(viewer, labels_layer)
                plane = tuple(slice(None) if a not in axes else int(here[a]) for a in range(labels_layer.ndim))
            fixed_at = None if plane is None else tuple((a, p) for a, p in enumerate(plane) if isinstance(p, int))
            key = (fixed_at, cid, divisor)
            queues = self._queues.setdefault(labels_layer, {})
            if update or key not in queues:
                data = labels_layer.data
                used = (pr.used_labels(data, boxes=label_boxes(labels_layer)) if whole
                        else pr.used_labels(np.asarray(data[tuple(plane)])))
                queues[key] = pr.available_labels(used, cid, divisor)
            label = next(queues[key], None)
            _common.require(label is not None, f"Class {cid} has no unused label left below "
                            f"{(cid + 1) * divisor}; tick 'Update labels' to look again.")
        except PanoptemError as err:
            show_error(str(err))
            return None
        labels_layer.selected_label = int(label)
        viewer.layers.selection.active = labels_layer
        show_info(f"Next available label of class {cid}: {label}")
        return int(label)
