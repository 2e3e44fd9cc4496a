"""NetVLAD 튜토리얼: the helper package of the course, one module per stage.

- `data`: stage 1, datasets (`.mat` dbStruct, positives, negatives); `synthetic`: the tiny city
- `model`: stage 2, VGG16-conv5 + NetVLAD (+ PCA whitening)
- `features`: stage 3, the descriptor cache
- `mining`: stage 4, hard-negative mining, tuples, `collate_fn`, triplet loss
- `train`: stage 5, training with cache refreshes, checkpoints, presets
- `evaluate`: stage 6, exact search and Recall@N
- `viz`: the figures of every stage
"""

from .utils import (
    atomic_save,
    course_data_root,
    default_data_root,
    ensure_synthetic_city,
    get_device,
    load_torch_file,
    resolve_precision,
    runs_dir,
    set_seed,
)

__version__ = "0.1.0"

__all__ = [
    "atomic_save",
    "course_data_root",
    "default_data_root",
    "ensure_synthetic_city",
    "get_device",
    "load_torch_file",
    "resolve_precision",
    "runs_dir",
    "set_seed",
]
