"""NetVLAD 튜토리얼: the helper package of the course, one module per stage.

- `utils`, `files`, `precision`: helpers (seeds and paths; atomic files and locks; device and
  fp32/bf16); `distributed`: torchrun; `config`: a run's settings (`TrainConfig`, `PRESETS`)
- stage 1, the data: `dbstruct` (the `.mat` files), `images`, `data` (positives, negatives,
  `load_split`), `datacheck`; `synthetic`: the tiny city; `world`: the pretraining images
- `features`: stage 3, the one inference loop and the descriptor caches
- stage 2, the network: `backbone` (VGG16 conv5), `netvlad`, `centroids` (k-means init), `pca`,
  `model` (the whole model, `make_model`), `checkpoints` (released and own weights);
  `pretrain`: the encoder shipped with the package
- `pooling`: why NetVLAD, the poolings it is compared with; `weights`, `datasets`: opt-in
  downloads
- `mining`: stage 4, hard-negative mining, tuples, `collate_fn`, triplet loss
- `run_model`: where a run's descriptors come from, decided once
- `evaluate`: stage 6, exact search, Recall@N, paired tests, the similarity matrix,
  precision-recall curves
- `search`: approximate search with faiss; `rerank`: re-ranking by local features
- `train`: stage 5, training with cache refreshes, checkpoints, resume
- `viz`: the figures of every stage; `lessons`: measurements only the course uses; `cli`: the
  command line

GUIDE.md, "How the package is organized", gives what each module imports.
"""

__version__ = "0.1.0"

from .files import atomic_save, load_torch_file
from .precision import get_device, resolve_precision
from .synthetic import course_data_root, ensure_synthetic_city  # noqa: E402
from .utils import default_data_root, runs_dir, set_seed

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
