"""Why NetVLAD: the poolings it is compared with, on the same local features (N, D, h, w).

Reads top to bottom like the ablation: global average, max and GeM pooling (one D-vector per
image) -> VLAD with the NetVLAD layer's own centroids, hard (argmax) or soft assignment, with or
without intra-normalization -> `pool_features`, which runs any of them over cached features.
Every descriptor is L2-normalized at the end, so that Euclidean search compares directions.
"""

import numpy as np
import torch
import torch.nn.functional as F

POOLINGS = ("average", "max", "gem", "hard-vlad", "netvlad")


def average_pool(x):
    """Global average pooling: the mean local descriptor (N, D), L2-normalized."""
    return F.normalize(x.mean(dim=(2, 3)), dim=1)  # (N, D)


def max_pool(x):
    """Global max pooling (MAC): each channel's largest response (N, D), L2-normalized."""
    return F.normalize(x.amax(dim=(2, 3)), dim=1)  # (N, D)


def gem_pool(x, p=3.0, eps=1e-6):
    """Generalized-mean (GeM) pooling: (mean of x^p)^(1/p) per channel (N, D), L2-normalized.

    p = 1 is average pooling and p -> inf tends to max pooling. Responses are clamped at `eps`
    first (conv5_3 here is taken before its ReLU, so negatives are dropped, as a ReLU would).
    """
    return F.normalize(x.clamp_min(eps).pow(p).mean(dim=(2, 3)).pow(1.0 / p), dim=1)  # (N, D)


def vlad_pool(x, layer, hard=False, intra_norm=True):
    """VLAD of local features `x` (N, D, h, w) with the centroids of a `netvlad.NetVLAD` layer.

    Args:
        layer: the NetVLAD layer whose centroids and assignment (1x1 conv) are used; its
            input normalization is kept.
        hard: assign each local descriptor to its single best cluster (the argmax of the
            layer's assignment scores: the limit of the soft-assignment as α -> inf), as the
            original VLAD does; False: the layer's softmax, i.e. NetVLAD.
        intra_norm: L2-normalize each cluster's residual sum before the final normalization
            (what NetVLAD does against burstiness: no cluster can dominate the vector).

    Returns:
        (N, K*D) float32 descriptors; with `hard=False, intra_norm=True`, exactly `layer(x)`.
    """
    x = x.float()
    if layer.normalize_input:
        x = F.normalize(x, dim=1)  # `x`: (N, D, h, w), unit length along D
    scores = layer.conv(x)  # `scores`: (N, K, h, w)
    if hard:
        a = F.one_hot(scores.argmax(1), layer.num_clusters).permute(0, 3, 1, 2).float()
    else:
        a = F.softmax(scores, dim=1)  # `a`: (N, K, h, w), sums to 1 over K
    x, a = x.flatten(2), a.flatten(2)  # `x`: (N, D, h*w), `a`: (N, K, h*w)
    vlad = a @ x.transpose(1, 2) - a.sum(2, keepdim=True) * layer.centroids  # (N, K, D)
    if intra_norm:
        vlad = F.normalize(vlad, dim=2)
    return F.normalize(vlad.flatten(1), dim=1)  # (N, K*D)


def pool(x, method, layer=None, intra_norm=True, p=3.0):
    """Local features `x` (N, D, h, w) pooled by `method`, one of `POOLINGS`."""
    if method == "average":
        return average_pool(x)
    if method == "max":
        return max_pool(x)
    if method == "gem":
        return gem_pool(x, p=p)
    if method in ("hard-vlad", "netvlad"):
        if layer is None:
            raise ValueError(f"{method} needs the NetVLAD layer (its centroids): layer=")
        return vlad_pool(x, layer, hard=method == "hard-vlad", intra_norm=intra_norm)
    raise ValueError(f"unknown pooling {method!r}; choose one of {', '.join(POOLINGS)}")


def pool_features(features, method, layer=None, intra_norm=True, p=3.0, batch_size=64,
                  device="cpu"):
    """`pool` over cached local features (N, D, h, w) (numpy, memmap or tensor), a batch at a
    time, computed in float32 without gradients: (N, out_dim) float32 numpy."""
    if layer is not None:
        layer = layer.to(device)
    out = []
    with torch.no_grad():
        for start in range(0, len(features), batch_size):
            x = torch.as_tensor(np.asarray(features[start:start + batch_size]))
            out.append(pool(x.to(device).float(), method, layer, intra_norm, p).cpu())
    return torch.cat(out).numpy()  # (N, out_dim)
