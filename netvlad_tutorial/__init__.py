"""NetVLAD 튜토리얼: the helper package of the course, one module per stage.

- `config`: the settings of a run (`TrainConfig`) and its presets (`PRESETS`)
- `data`: stage 1, datasets (`.mat` dbStruct, positives, negatives); `synthetic`: the tiny city
- `model`: stage 2, VGG16-conv5 + NetVLAD (+ PCA whitening), k-means init, `make_model`
- `features`: stage 3, the one inference loop and the descriptor caches
- `mining`: stage 4, hard-negative mining, tuples, `collate_fn`, triplet loss
- `train`: stage 5, training with cache refreshes, checkpoints, resume
- `pooling`: why NetVLAD, the poolings it is compared with; `datasets`: real photographs (opt-in)
- `evaluate`: stage 6 (and the recall of 3 and 5), exact search, Recall@N, checkpoints, PCA;
  the similarity matrix, precision-recall curves, AUC
- `search`: approximate search with faiss; `rerank`: re-ranking by local features
- `viz`: the figures of every stage; `cli`: the command line

The README's "How the package is organized" gives what each module may import.
"""

__version__ = "0.1.0"

from .synthetic import course_data_root, ensure_synthetic_city  # noqa: E402
from .utils import (  # noqa: E402
    atomic_save,
    default_data_root,
    get_device,
    load_torch_file,
    resolve_precision,
    runs_dir,
    set_seed,
)

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
