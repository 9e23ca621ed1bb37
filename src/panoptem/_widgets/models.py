"""The model-management widgets: Register, Get info, Export, Import and Archive a model.

Each maps its fields onto one core call: :func:`panoptem.registry.register_model`,
:func:`panoptem.registry.model_info`, and :mod:`panoptem.model_archive`'s
``export_model`` / ``import_model`` / ``archive_model``. Work that may download or copy
large files (register with a URL, export, import) runs through
:func:`panoptem._widgets._worker.start_job` with a progress bar; results and errors are
napari notifications. Titles, labels, defaults and button texts are the original's.

Path-or-URL fields are file pickers (as in the original) in which a URL can also be typed or
pasted; magicgui turns their text into a file path (``https://`` becomes ``.../https:/``),
so :func:`path_or_url` restores the URL.
"""

from __future__ import annotations

import re
from pathlib import Path

import napari
from magicgui.widgets import FunctionGui
from napari.utils.notifications import show_error, show_info, show_warning

from panoptem import model_archive, registry
from panoptem._download import is_url
from panoptem._widgets import _common as common
from panoptem._widgets import _settings
from panoptem._widgets._worker import start_job
from panoptem.errors import PanoptemError

__all__ = [
    "RegisterModel",
    "ModelInfo",
    "ExportModel",
    "ImportModel",
    "ArchiveModel",
    "path_or_url",
]

_URL_IN_PATH = re.compile(r"(https?):[\\/]+(.*)$", re.IGNORECASE)


def path_or_url(value) -> str | None:
    """The text of a path-or-URL field: None when empty, a URL restored if one was typed."""
    if value is None:
        return None
    text = str(value).strip()
    if text in ("", "."):
        return None
    match = _URL_IN_PATH.search(text)
    if match:
        return f"{match.group(1).lower()}://{match.group(2).replace(chr(92), '/')}"
    return text


def _file_or_url(value) -> str | None:
    """Like :func:`path_or_url` for file fields: a folder (a cleared field) counts as empty."""
    text = path_or_url(value)
    if text is not None and not is_url(text) and Path(text).is_dir():
        return None
    return text


def _model_combo(tooltip: str) -> dict:
    return {**common.model_combo_options(label="Model name"), "tooltip": tooltip}


def _fail(err: PanoptemError) -> None:
    show_error(str(err))


# --------------------------------------------------------------------------------------
# Register a model
# --------------------------------------------------------------------------------------
def _register_work(name: str, config_file: str, model: str | None, quantized: str | None):
    """Fetch every URL the model will use (reachability, and the cache), then register."""

    def work(progress):
        config = registry.read_config(config_file)
        notes: list[str] = []
        sources = [
            (model or config["model"], None if model else config.get("model_hash"), True),
            (quantized or config.get("model_quantized"),
             None if quantized else config.get("model_quantized_hash"), bool(quantized)),
        ]
        for ref, known_hash, required in sources:
            if not (isinstance(ref, str) and is_url(ref)):
                continue  # local files are checked by register_model
            try:
                registry.fetch_file(ref, known_hash, progress)
            except PanoptemError as err:
                if required:
                    raise
                notes.append(f"The config's quantized model is not reachable now ({err}); "
                             "the float model is used until it is.")
        registered = registry.register_model(name, config_file, model, quantized)
        return registered, notes

    return work


class RegisterModel(FunctionGui):
    """The "Register a model" widget (npe2 widget contribution).

    Clicking "Register model" (or calling the widget) returns the started
    :class:`~panoptem._widgets._worker.Job`, or None when a field is missing (the reason is
    a notification).
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(
            self.register_model,
            call_button="Register model",
            layout="vertical",
            name="register_model",
            param_options=dict(
                model_name=dict(widget_type="LineEdit", value="", label="Model name",
                                tooltip="Name under which the model appears in the model lists"),
                config_file=dict(widget_type="FileEdit", value="", label="Model config file",
                                 mode="r", filter="*.yaml",
                                 tooltip="The model's .yaml config (empanada format)"),
                model_file=dict(widget_type="FileEdit", value="", label="Model file (optional)",
                                mode="r", tooltip="TorchScript .pth file, or its http(s) URL; "
                                                  "replaces the config's 'model'"),
                model_quant_file=dict(widget_type="FileEdit", value="",
                                      label="Quantized model file (optional)", mode="r",
                                      tooltip="Quantized (int8, CPU) .pth file, or its http(s) "
                                              "URL; replaces the config's 'model_quantized'"),
            ),
        )

    def register_model(self, model_name: str, config_file, model_file, model_quant_file):
        try:
            name = str(model_name or "").strip()
            common.require(bool(name), "Model name cannot be empty: type a name for the model.")
            config = _file_or_url(config_file)
            common.require(config is not None,
                           "Choose the model's config file (.yaml) in 'Model config file'.")
            common.require(not is_url(config),
                           "'Model config file' must be a local .yaml file, not a URL.")
            _settings.apply_model_home()
        except PanoptemError as err:
            _fail(err)
            return None

        def done(result) -> None:
            registered, notes = result
            for note in notes:
                show_warning(note)
            renamed = f" (the name '{name}' was taken)" if registered != name else ""
            show_info(f"Registered model '{registered}'{renamed}; it is now in every model list.")

        work = _register_work(name, config, _file_or_url(model_file),
                              _file_or_url(model_quant_file))
        return start_job(work, title="Register model", on_done=done)


# --------------------------------------------------------------------------------------
# Get model info
# --------------------------------------------------------------------------------------
class ModelInfo(FunctionGui):
    """The "Get model info" widget (npe2 widget contribution).

    The info of the chosen model is shown in the widget's "Model info" box (updated when
    the model changes); the button also prints it to the terminal, as its text says.
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(
            self.get_model_info,
            call_button="Print info to terminal",
            layout="vertical",
            name="model_info",
            param_options=dict(
                model_name=_model_combo("Model whose description, padding and classes are shown"),
                model_info=dict(widget_type="TextEdit", value="", label="Model info",
                                tooltip="Information about the chosen model (read only)"),
            ),
        )
        # shown here; its text is not an input of the call
        self.model_info.native.setReadOnly(True)
        self.model_info.native.setMinimumHeight(180)
        common.install_model_refresh(self.model_name)
        self.model_name.changed.connect(lambda name: self._show(name, quiet=True))
        self._show(self.model_name.value, quiet=True)

    def get_model_info(self, model_name: str, model_info: str = ""):
        text = self._show(model_name)
        if text is not None:
            print(f"\n{text}\n", flush=True)
        return text

    def _show(self, model_name: str | None, quiet: bool = False) -> str | None:
        try:
            common.require(bool(model_name), "No model is registered; register one with "
                                             "'Register a model'.")
            text = registry.model_info(model_name).summary()
        except PanoptemError as err:
            self.model_info.value = ""
            if not quiet:
                _fail(err)
            return None
        self.model_info.value = text
        return text


# --------------------------------------------------------------------------------------
# Export / import a model
# --------------------------------------------------------------------------------------
class ExportModel(FunctionGui):
    """The "Export a model" widget: writes ``<Export path>/<model>.empanada``."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(
            self.export_model,
            call_button="Export model",
            layout="vertical",
            name="export_model",
            param_options=dict(
                model_name=_model_combo("Model to write into a .empanada archive"),
                export_path=dict(widget_type="FileEdit", label="Export path", mode="d",
                                 tooltip="Folder that receives <model name>.empanada"),
            ),
        )
        common.install_model_refresh(self.model_name)

    def export_model(self, model_name: str, export_path):
        try:
            common.require(bool(model_name), "Choose the model to export.")
            folder = path_or_url(export_path)
            common.require(folder is not None,
                           "Choose the folder to write the archive into ('Export path').")
            _settings.apply_model_home()
            target = model_archive.archive_path(model_name, folder)  # refused before any work
        except PanoptemError as err:
            _fail(err)
            return None

        def work(progress):
            return model_archive.export_model(model_name, target, progress=progress)

        return start_job(work, title="Export model",
                         on_done=lambda path: show_info(f"Model exported to {path}"))


class ImportModel(FunctionGui):
    """The "Import a model" widget: registers the model of a ``.empanada`` archive."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(
            self.import_model,
            call_button="Import model",
            layout="vertical",
            name="import_model",
            param_options=dict(
                model_name=dict(widget_type="LineEdit", value="NewModelImported",
                                label="New model name (no spaces)",
                                tooltip="Name under which the imported model is registered"),
                import_path=dict(widget_type="FileEdit", label="Model file", mode="r",
                                 filter="*.empanada", tooltip="The .empanada archive to import"),
            ),
        )

    def import_model(self, model_name: str, import_path):
        try:
            name = str(model_name or "").strip()
            common.require(bool(name), "Type the name to register the imported model under.")
            archive = _file_or_url(import_path)
            common.require(archive is not None,
                           "Choose the .empanada file to import ('Model file').")
            _settings.apply_model_home()
        except PanoptemError as err:
            _fail(err)
            return None

        def work(progress):
            return model_archive.import_model(archive, name, progress=progress)

        def done(registered: str) -> None:
            renamed = f" (the name '{name}' was taken)" if registered != name else ""
            show_info(f"Model imported as '{registered}'{renamed}; files in "
                      f"{model_archive.models_dir()}.")

        return start_job(work, title="Import model", on_done=done)


# --------------------------------------------------------------------------------------
# Archive a model
# --------------------------------------------------------------------------------------
class ArchiveModel(FunctionGui):
    """The "Archive a model" widget: moves a user model out of the lists (nothing deleted)."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(
            self.archive_model,
            call_button="Archive model",
            layout="vertical",
            name="archive_model",
            param_options=dict(
                model_name=_model_combo("Registered model to move into the archived folder")),
        )
        common.install_model_refresh(self.model_name)

    def archive_model(self, model_name: str):
        try:
            common.require(bool(model_name), "Choose the model to archive.")
            _settings.apply_model_home()
            path = model_archive.archive_model(model_name)
        except PanoptemError as err:
            _fail(err)
            return None
        self.model_name.reset_choices()
        show_info(f"Model '{model_name}' archived: its config and files are in "
                  f"{path.parent} (config {path.name}).")
        return str(path)
