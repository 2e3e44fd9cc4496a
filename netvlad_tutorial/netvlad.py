"""Stage 2b: the NetVLAD layer (Arandjelovic et al., CVPR 2016): first a per-cluster loop, then
the same thing as one matrix product.
"""


import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .precision import autocast_off


def netvlad_loop(x, conv, centroids, normalize_input=True):
    """NetVLAD written as a plain loop over clusters (the reference the layer is tested against).

    Args:
        x: local descriptors (B, D, H, W).
        conv: the soft-assignment 1x1 convolution, D -> K channels.
        centroids: (K, D).
    """
    if normalize_input:
        x = F.normalize(x, dim=1)  # `x`: (B, D, H, W), unit length along D
    a = F.softmax(conv(x), dim=1).flatten(2)  # `a`: (B, K, H*W), sums to 1 over K
    x = x.flatten(2)  # `x`: (B, D, H*W)
    vlad = []
    for k in range(centroids.shape[0]):
        residual = x - centroids[k][None, :, None]  # `residual`: (B, D, H*W)
        vlad.append((a[:, k:k + 1] * residual).sum(2))  # (B, D)
    vlad = torch.stack(vlad, dim=1)  # `vlad`: (B, K, D)
    vlad = F.normalize(vlad, dim=2)  # intra-normalization
    return F.normalize(vlad.flatten(1), dim=1)  # (B, K*D)


def assignment_alpha(centroids, descriptors):
    """The reference α = −ln(0.01) / mean(top1 − top2) of descriptor·centroid dot products.

    At the mean gap, the second-nearest centroid gets 1/100 of the nearest one's weight.

    Args:
        centroids: (K, D), normalized here.
        descriptors: (N, D) local descriptors (L2-normalized, as the layer sees them).
    """
    c = np.asarray(centroids, dtype=np.float64)
    c = c / np.linalg.norm(c, axis=1, keepdims=True)  # `c`: (K, D)
    dots = np.sort(np.asarray(descriptors, dtype=np.float64) @ c.T, axis=1)  # `dots`: (N, K)
    return float(-np.log(0.01) / np.mean(dots[:, -1] - dots[:, -2]))


class NetVLAD(nn.Module):
    """NetVLAD pooling: soft-assigned residuals to K centroids, intra- then L2-normalized.

    Args:
        num_clusters: K, the number of centroids.
        dim: D, the channels of the local descriptors.
        alpha: sharpness of the soft-assignment to the initial (random) centroids; k-means
            initialization (`init_params`) replaces both.
        normalize_input: L2-normalize each local descriptor first (as the reference).
        bias: give the assignment convolution a bias (the reference, NetVLAD v1, has none).
    """

    def __init__(self, num_clusters=64, dim=512, alpha=100.0, normalize_input=True, bias=False):
        super().__init__()
        self.num_clusters, self.dim, self.normalize_input = num_clusters, dim, normalize_input
        self.conv = nn.Conv2d(dim, num_clusters, kernel_size=1, bias=bias)
        self.centroids = nn.Parameter(torch.rand(num_clusters, dim))  # `centroids`: (K, D)
        self.set_centroids(self.centroids.detach(), alpha)

    def set_centroids(self, centroids, alpha):
        """Set the centroids and the assignment weights α·(normalized centroid), bias 0."""
        centroids = torch.as_tensor(centroids, dtype=torch.float32)  # `centroids`: (K, D)
        if centroids.shape != self.centroids.shape:
            raise ValueError(f"centroids of shape {tuple(centroids.shape)} given, this layer "
                             f"expects (K, D) = {tuple(self.centroids.shape)}")
        weight = alpha * F.normalize(centroids, dim=1)[:, :, None, None]  # (K, D, 1, 1)
        with torch.no_grad():
            self.centroids.copy_(centroids)
            self.conv.weight.copy_(weight)
            if self.conv.bias is not None:
                self.conv.bias.zero_()
        self.alpha = float(alpha)

    def init_params(self, centroids, descriptors):
        """Initialize from k-means `centroids` (K, D) and the `descriptors` (N, D) they fit."""
        self.set_centroids(centroids, assignment_alpha(centroids, descriptors))

    def _assign(self, x):
        """`x` in float32, L2-normalized if `normalize_input`, and its soft-assignment."""
        x = x.float()
        if self.normalize_input:
            x = F.normalize(x, dim=1)  # `x`: (B, D, H, W), unit length along D
        return x, F.softmax(self.conv(x), dim=1)  # `a`: (B, K, H, W)

    def soft_assign(self, x):
        """Weight of each cluster at each position (B, K, H, W) of local descriptors `x`."""
        with autocast_off(x):
            return self._assign(x)[1]

    def forward(self, x):
        """VLAD vectors (B, K*D) of local descriptors `x` (B, D, H, W), computed in float32."""
        with autocast_off(x):
            x, a = self._assign(x)
            x, a = x.flatten(2), a.flatten(2)  # `x`: (B, D, N), `a`: (B, K, N) with N = H*W
            # sum_n a_kn (x_n - c_k) = sum_n a_kn x_n - (sum_n a_kn) c_k, for all k at once
            vlad = a @ x.transpose(1, 2) - a.sum(2, keepdim=True) * self.centroids  # (B, K, D)
            vlad = F.normalize(vlad, dim=2)  # intra-normalization
            return F.normalize(vlad.flatten(1), dim=1)  # (B, K*D)
