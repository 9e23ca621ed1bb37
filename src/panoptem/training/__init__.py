"""Training: datasets, losses, the training loop, configs and export.

Submodules: :mod:`.datasets` (folder layout, pairing, sampling weights, torch datasets),
:mod:`.augment` (joint image/mask augmentations), :mod:`.targets` (heat map, offsets and
semantic targets), :mod:`.losses`, :mod:`.loop`, :mod:`.config` and :mod:`.export`. The
data-side names are re-exported here.
"""

from panoptem.training.augment import (
    Compose,
    augmentations_from_config,
    default_augmentations,
)
from panoptem.training.datasets import (
    DEFAULT_NORMS,
    PanopticDataset,
    SingleClassInstanceDataset,
    find_pairs,
    image_norms,
    make_sampler,
    sampling_weights,
)
from panoptem.training.targets import heatmap_and_offsets, panoptic_targets

__all__ = [
    "DEFAULT_NORMS",
    "Compose",
    "PanopticDataset",
    "SingleClassInstanceDataset",
    "augmentations_from_config",
    "default_augmentations",
    "find_pairs",
    "heatmap_and_offsets",
    "image_norms",
    "make_sampler",
    "panoptic_targets",
    "sampling_weights",
]
