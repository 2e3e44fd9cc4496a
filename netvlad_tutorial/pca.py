"""Stage 2d: PCA whitening of the NetVLAD descriptor (the paper's 4096-D output).
"""


import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .precision import autocast_off


class PCAWhitening(nn.Module):
    """PCA projection with whitening as a linear layer `W v + b`, then L2-normalization."""

    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.linear = nn.Linear(in_dim, out_dim)
        self.linear.requires_grad_(False)  # fitted by `fit_pca_whitening`, not trained

    def forward(self, v):
        """Whitened unit descriptors (B, out_dim) of `v` (B, in_dim), computed in float32."""
        with autocast_off(v):
            return F.normalize(self.linear(v.float()), dim=1)  # (B, out_dim)


def fit_pca_whitening(descs, out_dim, eps=1e-9):
    """PCA whitening fitted on descriptors `descs` (N, D), as in Relja's NetVLAD (`addPCA`).

    W = diag(1 / sqrt(λ + eps)) Uᵀ and b = −W·mean, with U the top `out_dim` eigenvectors of
    the covariance and λ their eigenvalues, computed in float64. With N < D the eigenvectors
    come from the N×N Gram matrix instead of the D×D covariance.

    Args:
        descs: (N, D) array or tensor (reference: up to 10,000 database descriptors).
        out_dim: at most min(N − 1, D): centered, N descriptors span N − 1 dimensions.
    """
    X = torch.as_tensor(np.asarray(descs)).to(torch.float64, copy=True)  # `X`: (N, D)
    n, d = X.shape
    if not 1 <= out_dim <= min(n - 1, d):
        raise ValueError(f"out_dim={out_dim} must be between 1 and min(N - 1, D) = "
                         f"{min(n - 1, d)} for {n} descriptors of dimension {d}")
    mean = X.mean(0)  # `mean`: (D,)
    X -= mean
    if n < d:
        lam, V = torch.linalg.eigh(X @ X.T / (n - 1))  # `V`: (N, N), λ ascending
        lam, V = lam.flip(0)[:out_dim], V.flip(1)[:, :out_dim]  # `V`: (N, out_dim)
        U = X.T @ V / torch.sqrt(lam * (n - 1))  # `U`: (D, out_dim), unit columns
    else:
        lam, U = torch.linalg.eigh(X.T @ X / (n - 1))  # `U`: (D, D)
        lam, U = lam.flip(0)[:out_dim], U.flip(1)[:, :out_dim]  # `U`: (D, out_dim)
    W = U.T / torch.sqrt(lam + eps)[:, None]  # `W`: (out_dim, D)
    pca = PCAWhitening(d, out_dim)
    with torch.no_grad():
        pca.linear.weight.copy_(W)
        pca.linear.bias.copy_(-W @ mean)
    return pca
