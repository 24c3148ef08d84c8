"""k-NN manifolds: precision and recall (Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric for
Assessing Generative Models"), k = 3 nearest neighbours: a generated sample is *precise* when it
falls inside the union of the k-NN balls of the real features, and a real sample is *recalled*
when it falls inside the balls of the generated ones. Distances in blocks, on torch, float64-safe.
"""

from __future__ import annotations

import numpy as np
import torch

from sgexp.checks import check_positive_int, fail


def _sq_distances(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared distances (len(a), len(b)) via one matmul, and the rounding slack of that expansion.

    The slack lets exact duplicates (distance 0, computed as a tiny positive number)
    count as inside each other's k-NN ball.
    """
    na, nb = (a * a).sum(1, keepdim=True), (b * b).sum(1)
    return (na + nb - 2.0 * a @ b.T).clamp_min_(0.0), 1e-9 * (na + nb)


def _knn_sq_radii(feats: torch.Tensor, k: int, block: int) -> torch.Tensor:
    """Squared distance from each point to its k-th nearest neighbour in the same set, itself excluded."""
    # kthvalue(k + 1): the point itself (distance ~0) is always the nearest
    return torch.cat(
        [
            _sq_distances(feats[i : i + block], feats)[0].kthvalue(k + 1, dim=1).values
            for i in range(0, len(feats), block)
        ]
    )


def _inside(points: torch.Tensor, centres: torch.Tensor, sq_radii: torch.Tensor, block: int) -> np.ndarray:
    """Per point of ``points``: inside at least one ball (centre, radius) of the other set's k-NN manifold."""
    inside = []
    for i in range(0, len(points), block):
        d2, slack = _sq_distances(points[i : i + block], centres)
        inside.append((d2 <= sq_radii[None, :] + slack).any(dim=1).numpy())
    return np.concatenate(inside)


def _coverage(points: torch.Tensor, centres: torch.Tensor, sq_radii: torch.Tensor, block: int) -> float:
    """Fraction of ``points`` inside the other set's k-NN manifold."""
    return int(_inside(points, centres, sq_radii, block).sum()) / len(points)


def _pr_sets(real_feats: np.ndarray, fake_feats: np.ndarray, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    check_positive_int("k", k)
    real, fake = (torch.as_tensor(np.asarray(f), dtype=torch.float64) for f in (real_feats, fake_feats))
    for name, feats in (("real_feats", real), ("fake_feats", fake)):
        if feats.dim() != 2 or len(feats) <= k:
            raise fail(name, f"shape {tuple(feats.shape)}", f"needs a (N, dim) array with N > k={k}")
    if real.shape[1] != fake.shape[1]:
        raise fail("fake_feats", f"shape {tuple(fake.shape)}", f"real features have dim {real.shape[1]}")
    return real, fake


def precision_recall(
    real_feats: np.ndarray, fake_feats: np.ndarray, k: int = 3, block: int = 1024
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019).

    Each set's manifold is the union of balls around its points with radius the
    distance to the k-th nearest neighbour. Precision: fraction of fake samples
    inside the real manifold (fidelity). Recall: fraction of real samples inside the
    fake manifold (diversity). The k-NN radii shrink as a set grows, so compare sets
    of equal size (``compute_metrics`` subsamples the reference to the sample count).
    """
    real, fake = _pr_sets(real_feats, fake_feats, k)
    precision = _coverage(fake, real, _knn_sq_radii(real, k, block), block)
    recall = _coverage(real, fake, _knn_sq_radii(fake, k, block), block)
    return precision, recall


def precision_indicators(real_feats: np.ndarray, fake_feats: np.ndarray, k: int = 3, block: int = 1024) -> np.ndarray:
    """Per fake sample: inside the real k-NN manifold; precision is their mean.

    The real manifold does not depend on the fake samples, so a bootstrap over sample
    indices resamples these indicators directly (``sgexp.eval.bootstrap``). Recall has
    no such per-sample form: it counts real points inside the *fake* manifold, whose
    k-NN radii change when fake samples are duplicated.
    """
    real, fake = _pr_sets(real_feats, fake_feats, k)
    return _inside(fake, real, _knn_sq_radii(real, k, block), block)
