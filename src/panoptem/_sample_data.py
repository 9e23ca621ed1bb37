"""napari sample data: the FIB-SEM image shipped with panoptem (a Lucchi++ crop).

512 x 512 uint8, mouse CA1 hippocampus, about 5 nm pixels; origin, citation and terms in
``panoptem/data/SOURCE.md``. No napari import here.
"""

from __future__ import annotations

__all__ = ["lucchi_sample"]


def lucchi_sample() -> list[tuple]:
    """npe2 sample-data hook: ``[(image, {"name": ...}, "image")]``."""
    from panoptem.demo import sample_image

    return [(sample_image(), {"name": "lucchi_pp_sample"}, "image")]
