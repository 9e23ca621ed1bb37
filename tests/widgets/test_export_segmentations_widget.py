"""Export Segmentations, opened from the Plugins menu and clicked as a user does: fields as
in the original, files for 2D and 3D labels (slices named after the layer or after the files
of an opened folder), appending without overwriting, errors as notifications."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from scipy import ndimage
from widgetutils import click, open_from_menu

from testutils import EM_DATA, read_png

TITLE = "Export Segmentations"


@pytest.fixture
def viewer(make_napari_viewer):
    return make_napari_viewer()


@pytest.fixture
def em_2d(lucchi_image):
    mask = read_png(EM_DATA / "lucchi_test_0000_mask.png")[..., 0] > 0
    return lucchi_image, ndimage.label(mask)[0].astype(np.int32)


@pytest.fixture
def em_3d(em_volume):
    volume = em_volume[:12]
    return volume, ndimage.label(ndimage.binary_opening(volume < 110, iterations=2))[0]


def _texts(notifications, level: str) -> list[str]:
    return [text for severity, text in notifications if severity == level]


def _set(widget, **values):
    widget.reset_choices()
    for name, value in values.items():
        getattr(widget, name).value = value


def test_fields_and_defaults_are_the_originals(viewer):
    widget = open_from_menu(viewer, TITLE)
    assert widget._call_button.text == "Export labels"
    assert [w.label for w in widget if w is not widget._call_button] == [
        "image layer",
        "labels layer",
        "Export type",
        "Folder name",
        "Save directory",
        "Export grayscale image",
    ]
    assert widget.grayscale.text == "Export grayscale image" and widget.grayscale.value is False
    assert type(widget.export_type).__name__ == "RadioButtons"
    assert widget.export_type.choices == ("2D images", "3D image")
    assert widget.export_type.value == "2D images"
    assert widget.dataset_name.value == ""
    assert widget.save_dir.mode.value == "d"


def test_export_2d_with_image_and_append(viewer, wait_job, notifications, tmp_path, em_2d):
    image, labels = em_2d
    image_layer = viewer.add_image(image, name="lucchi")
    labels_layer = viewer.add_labels(labels, name="lucchi_labels")
    widget = open_from_menu(viewer, TITLE)
    _set(
        widget,
        image_layer=image_layer,
        labels_layer=labels_layer,
        dataset_name="mito",
        save_dir=tmp_path,
        grayscale=True,
    )
    job = wait_job(click(widget))
    assert job.error is None and job.result == [tmp_path / "mito" / "masks" / "lucchi.tiff"]
    mask = tifffile.imread(tmp_path / "mito" / "masks" / "lucchi.tiff")
    assert mask.dtype == np.uint8 and np.array_equal(mask, labels)
    assert np.array_equal(tifffile.imread(tmp_path / "mito" / "images" / "lucchi.tiff"), image)
    assert (
        f"Exported 1 label file to {tmp_path / 'mito' / 'masks'}"
        in _texts(notifications, "info")[-1]
    )

    # the same again: appended under a free name, the first pair untouched
    labels_layer.data = np.where(labels > 0, 7, 0).astype(np.int32)
    job = wait_job(click(widget))
    assert job.result == [tmp_path / "mito" / "masks" / "lucchi_1.tiff"]
    np.testing.assert_array_equal(
        tifffile.imread(tmp_path / "mito" / "masks" / "lucchi.tiff"), labels
    )
    assert (tmp_path / "mito" / "images" / "lucchi_1.tiff").is_file()


def test_export_3d_as_slices_and_as_one_file(viewer, wait_job, tmp_path, em_3d):
    volume, labels = em_3d
    image_layer = viewer.add_image(volume, name="vol")
    labels_layer = viewer.add_labels(labels, name="vol_labels")
    widget = open_from_menu(viewer, TITLE)
    _set(
        widget,
        image_layer=image_layer,
        labels_layer=labels_layer,
        dataset_name="ds",
        save_dir=tmp_path,
    )
    job = wait_job(click(widget))
    assert [p.name for p in job.result] == [f"vol_{i:02d}.tiff" for i in range(12)]
    np.testing.assert_array_equal(tifffile.imread(job.result[9]), labels[9])
    assert not (tmp_path / "ds" / "images").exists()  # "Export grayscale image" unticked

    _set(widget, export_type="3D image", grayscale=True)
    job = wait_job(click(widget))
    assert job.result == [tmp_path / "ds" / "masks" / "vol.tiff"]
    np.testing.assert_array_equal(tifffile.imread(job.result[0]), labels)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "ds" / "images" / "vol.tiff"), volume)


def test_a_stack_opened_from_a_folder_keeps_its_file_names(viewer, wait_job, tmp_path, em_3d):
    volume, labels = em_3d
    folder = tmp_path / "sections"
    folder.mkdir()
    names = [f"sec{i}.tif" for i in (1, 2, 10)]  # napari orders them 1, 2, 10
    for name, plane in zip(names, volume[:3], strict=True):
        tifffile.imwrite(folder / name, plane)
    (image_layer,) = viewer.open(folder, plugin="napari")
    assert type(image_layer.data).__module__.startswith("dask")
    labels_layer = viewer.add_labels(labels[:3], name="sections_labels")
    widget = open_from_menu(viewer, TITLE)
    _set(
        widget,
        image_layer=image_layer,
        labels_layer=labels_layer,
        dataset_name="ds",
        save_dir=tmp_path / "out",
        grayscale=True,
    )
    job = wait_job(click(widget))
    assert [p.name for p in job.result] == ["sec1.tiff", "sec2.tiff", "sec10.tiff"]
    np.testing.assert_array_equal(tifffile.imread(job.result[2]), labels[2])
    np.testing.assert_array_equal(
        tifffile.imread(tmp_path / "out" / "ds" / "images" / "sec10.tiff"), volume[2]
    )


def test_errors_are_notifications_and_nothing_is_written(viewer, notifications, tmp_path, em_2d):
    image, labels = em_2d
    image_layer = viewer.add_image(image, name="lucchi")
    labels_layer = viewer.add_labels(labels[:, :1000], name="cropped")
    widget = open_from_menu(viewer, TITLE)
    _set(
        widget,
        image_layer=image_layer,
        labels_layer=labels_layer,
        dataset_name="mito",
        save_dir=tmp_path,
    )
    assert click(widget) is None
    assert (
        "has shape (768, 1024) but the labels 'cropped' (768, 1000)"
        in _texts(notifications, "error")[-1]
    )
    assert list(tmp_path.iterdir()) == []

    _set(widget, labels_layer=viewer.add_labels(labels, name="full"), dataset_name="  ")
    assert click(widget) is None
    assert _texts(notifications, "error")[-1] == "Type a Folder name."
    widget.save_dir.line_edit.value = ""  # as a user leaves it empty
    _set(widget, dataset_name="mito")
    assert click(widget) is None
    assert _texts(notifications, "error")[-1] == "Choose the Save directory."
    assert list(tmp_path.iterdir()) == []
