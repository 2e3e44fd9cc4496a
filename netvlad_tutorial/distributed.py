"""Several GPUs or machines: the same commands under `torchrun`, with PyTorch's own engine.

`torchrun --nproc_per_node=N -m netvlad_tutorial train ...` starts N processes ("ranks") with
`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR` and `MASTER_PORT` in their environment;
`cli.main` then calls `init()` (NCCL on CUDA, gloo on CPU; each rank on `cuda:LOCAL_RANK`) and
`destroy()` at the end. Without that environment nothing here does anything: every function
answers as a single process would (rank 0 of 1), so the package runs exactly as before.

What is distributed (see the README, "Several GPUs or machines"):
- inference passes (cache refreshes, evaluation descriptors, the frozen-encoder feature cache):
  each rank encodes its `shard` of the images, `gather_rows` reassembles the full array, in
  image order, on every rank (`features.encode`);
- training: `DistributedDataParallel` over each global batch of tuples (`batch_plan`,
  `share_loss`), so the update is the one of a single process with the global batch;
- mining, validation: computed on rank 0 and broadcast (`broadcast_object`);
- files: rank 0 only (`files.is_main_process`); printing: rank 0 only where the command line
  runs its command inside `quiet_other_ranks()`.
"""

import contextlib
import datetime
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from .files import is_main_process
from .utils import hidden_progress

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
GATHER_CHUNK_MB = 64  # `gather_rows` moves at most this much per rank and step


def launched():
    """Whether this process was started by `torchrun` (its environment variables are set)."""
    return all(v in os.environ for v in LAUNCHER_VARS)


def is_initialized():
    """Whether a process group is running (after `init()`)."""
    return dist.is_available() and dist.is_initialized()


def rank():
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_initialized() else 0


def world_size():
    """The number of ranks (1 without a process group)."""
    return dist.get_world_size() if is_initialized() else 1


def local_rank():
    """This process's rank on its machine (`$LOCAL_RANK`, 0 when not launched)."""
    return int(os.environ.get("LOCAL_RANK", 0))


is_main = is_main_process  # rank 0, or a single process


def init(backend=None, timeout_s=1800):
    """Start the process group from the launcher's environment (`env://`).

    NCCL when CUDA is available (each rank on `cuda:LOCAL_RANK`), gloo otherwise. Does nothing
    when already initialized.

    Args:
        backend: "nccl" or "gloo"; default: by device as above.
        timeout_s: how long a collective waits for the other ranks.
    """
    if is_initialized():
        return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))


def destroy():
    """End the process group."""
    if is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def quiet_other_ranks():
    """Inside the block, on ranks other than 0: stdout goes nowhere and the package's progress
    bars are hidden (stderr still prints). Rank 0, or a single process: nothing changes."""
    if is_main():
        yield
        return
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), \
            hidden_progress():
        yield


def barrier():
    """Wait for every rank (a no-op without a process group)."""
    if is_initialized():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def comm_device():
    """Where collectives' tensors live: the current GPU under NCCL, else the CPU."""
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shard(n, rank_=None, world_size_=None):
    """This rank's contiguous block of `range(n)`: the blocks of all ranks cover it exactly once.

    No padding (unlike `DistributedSampler`, which repeats items to equal the shards): block
    sizes differ by at most one.

    Args:
        rank_, world_size_: default: this process's.
    """
    r = rank() if rank_ is None else rank_
    w = world_size() if world_size_ is None else world_size_
    return range(r * n // w, (r + 1) * n // w)


def broadcast_object(obj, src=0):
    """`obj` of rank `src` on every rank (any picklable object); `obj` itself without a group."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=comm_device())
    return box[0]


def all_gather_object(obj):
    """The list of every rank's `obj`, in rank order (`[obj]` without a group)."""
    if not is_initialized():
        return [obj]
    objs = [None] * world_size()
    dist.all_gather_object(objs, obj)
    return objs


def all_reduce_sum(value):
    """The sum over ranks of a float (a plain float; `value` itself without a group)."""
    if not is_initialized():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=comm_device())
    dist.all_reduce(t)
    return float(t.item())


def gather_rows(part, indices, n, out=None):
    """The full (n, ...) array on every rank from each rank's rows `part` at `indices`.

    Exact: rows travel as raw bytes (a float16 cache arrives bit for bit), in chunks of at
    most `GATHER_CHUNK_MB` per rank, so a disk-backed `out` never needs the whole array in RAM.

    Args:
        part: (len(indices), ...) numpy array, this rank's rows (every rank the same dtype and
            row shape).
        indices: (len(indices),) row numbers of `part` in the full array; the ranks' indices
            together cover `range(n)`, each once.
        n: the number of rows of the full array.
        out: the (n, ...) array to fill (e.g. a memmap); default: a new array in RAM.

    Returns:
        `out`, every row filled, in image order.
    """
    part = np.ascontiguousarray(part)
    indices = np.asarray(indices, dtype=np.int64)
    if out is None:
        out = np.empty((n, *part.shape[1:]), part.dtype)
    if not is_initialized():
        out[indices] = part
        return out
    row_bytes = part.dtype.itemsize * int(np.prod(part.shape[1:]))
    raw = part.reshape(len(part), -1).view(np.uint8).reshape(len(part), row_bytes)  # bytes
    device, w = comm_device(), world_size()
    counts = torch.tensor([len(part)], device=device)
    all_counts = [torch.zeros_like(counts) for _ in range(w)]
    dist.all_gather(all_counts, counts)
    max_rows = int(max(c.item() for c in all_counts))
    chunk = max(1, GATHER_CHUNK_MB * 2**20 // max(row_bytes, 1))
    for start in range(0, max_rows, chunk):
        rows = min(chunk, max_rows - start)
        buf = torch.zeros(rows, row_bytes, dtype=torch.uint8, device=device)  # padded rows
        idx = torch.full((rows,), -1, dtype=torch.int64, device=device)  # -1: padding
        mine = raw[start:start + rows]
        buf[:len(mine)] = torch.from_numpy(mine).to(device)
        idx[:len(mine)] = torch.from_numpy(indices[start:start + rows]).to(device)
        bufs = [torch.empty_like(buf) for _ in range(w)]
        idxs = [torch.empty_like(idx) for _ in range(w)]
        dist.all_gather(bufs, buf)
        dist.all_gather(idxs, idx)
        for b, i in zip(bufs, idxs):
            i = i.cpu().numpy()
            valid = i >= 0
            rows_bytes = b.cpu().numpy()[valid]  # (valid, row_bytes)
            out[i[valid]] = rows_bytes.view(part.dtype).reshape(-1, *part.shape[1:])
    return out


# ---------------------------------------------------------------------------------------------
# Training: DistributedDataParallel over global batches of tuples
# ---------------------------------------------------------------------------------------------

def ddp(module):
    """`module` wrapped in `DistributedDataParallel`, or `module` itself without a group.

    Build it once per run (the wrapper hooks the parameters' gradients). Only the wrapper is
    DDP: checkpoints keep saving `model.state_dict()`, never the wrapper's `module.`-prefixed
    one, so they load in a single process and the reverse.
    """
    if not is_initialized():
        return module
    device = next(module.parameters()).device
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)


def sync_module(module, src=0):
    """Copy `module`'s parameters and buffers from rank `src` to every rank (in place)."""
    if not is_initialized():
        return
    device = comm_device()
    with torch.no_grad():
        for t in module.state_dict().values():
            moved = t.to(device)
            dist.broadcast(moved, src)
            t.copy_(moved)


@dataclass(frozen=True)
class Share:
    """This rank's part of one global batch of tuples.

    local: dataset indices this rank trains on (never empty: a rank without tuples in a short
        last batch gets the batch's first one with `active=False`, i.e. weight 0, because DDP
        needs every rank's backward); global_: the whole global batch's indices.
    """

    local: list
    global_: list
    active: bool
    batch_negatives: int  # in the whole global batch


def batch_plan(neg_counts, batch_size):
    """This rank's `Share` of each global batch of `world_size() * batch_size` tuples, in order.

    Global batch g holds tuples `[g*W*b, (g+1)*W*b)`; rank r takes its `shard` of it, so the
    ranks together train on exactly the batches a single process with batch W*b trains on.

    Args:
        neg_counts: the number of negatives of each tuple.
        batch_size: b, tuples per rank and step.
    """
    w, n, plan = world_size(), len(neg_counts), []
    for start in range(0, n, w * batch_size):
        global_ = list(range(start, min(start + w * batch_size, n)))
        local = [global_[i] for i in shard(len(global_))]
        plan.append(Share(local or global_[:1], global_, bool(local),
                          int(sum(neg_counts[i] for i in global_))))
    return plan


def share_loss(loss, batch_negatives, share):
    """(loss to backpropagate, the global batch's loss) from this rank's `triplet_loss`.

    `triplet_loss` divides by the number of negatives of its batch; the global batch's loss
    divides the sum over all ranks by all their negatives. DDP averages gradients over the W
    ranks, so each rank backpropagates `W * sum_local / global_negatives`: the averaged
    gradient is then exactly that of the global batch's loss (ranks may hold unequal numbers
    of negatives).

    Args:
        loss: this rank's `triplet_loss` (a scalar tensor).
        batch_negatives: the negatives in this rank's batch.
        share: this rank's `Share` of the batch (inactive: its loss counts 0).
    """
    local_sum = loss * (batch_negatives if share.active else 0.0)
    value = all_reduce_sum(local_sum.detach().item()) / share.batch_negatives
    return local_sum * (world_size() / share.batch_negatives), value


def announce(batch_size, lr):
    """Print (rank 0) the ranks, the effective batch and the learning rate, once per run."""
    if is_initialized():
        print(f"distributed: {world_size()} ranks ({dist.get_backend()}) x batch {batch_size} "
              f"= effective batch {world_size() * batch_size} tuples per step, lr {lr:g} "
              "(not rescaled)")
