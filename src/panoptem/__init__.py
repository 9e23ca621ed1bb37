"""panoptem: panoptic segmentation of organelles in electron microscopy.

A headless library (this package) and a napari plugin (``panoptem._widgets``) that run
empanada / MitoNet model files and configs. Importing ``panoptem`` imports neither napari
nor Qt, and has no side effects (no folders are created, no global torch settings change).
"""

from panoptem.errors import Cancelled, PanoptemError
from panoptem.progress import Progress, TextProgress

__version__ = "0.1.0"

__all__ = ["__version__", "PanoptemError", "Cancelled", "Progress", "TextProgress"]
