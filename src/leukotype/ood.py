"""Out-of-distribution score: how far an image's features lie from the training features.

The training features (the classifier's input, one row per training sample) are modelled as a
Gaussian whose covariance is probabilistic PCA's: the top ``k`` principal directions with their
own variances plus one isotropic variance for everything else (Tipping & Bishop 1999). The
score of a feature vector is its Mahalanobis distance under that covariance, divided by
``sqrt(D)`` so that numbers are comparable across layers. Unlike a full-covariance Mahalanobis
distance it is defined when there are fewer training rows than feature dimensions, and unlike a
distance within the top components alone it sees images that differ in directions the
training data never varied in.

The flag's threshold is a quantile (default 0.99) of OUT-OF-FOLD distances of the training
part: the model is refitted on grouped folds and each training row is scored by the fit that
did not see its group, so an in-distribution image of a new patient is flagged about 1% of the
time rather than far more often (in-sample distances are optimistic). numpy only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from leukotype.errors import LeukotypeError

#: Principal directions kept (at most; fewer when there are fewer training rows).
DEFAULT_COMPONENTS = 32
DEFAULT_QUANTILE = 0.99


@dataclass(frozen=True)
class FeatureDensity:
    """Probabilistic-PCA Gaussian of training features; ``distance`` scores new rows."""

    mean: np.ndarray  # (D,)
    components: np.ndarray  # (k, D), orthonormal rows
    variances: np.ndarray  # (k,)
    noise_variance: float
    threshold: float = float("inf")
    quantile: float = DEFAULT_QUANTILE

    def distance(self, X: np.ndarray) -> np.ndarray:
        """Mahalanobis distance under the PPCA covariance, divided by sqrt(D)."""
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.mean.shape[0]:
            raise LeukotypeError(
                f"features of shape {X.shape} do not match the training features' dimension "
                f"{self.mean.shape[0]}"
            )
        centred = X - self.mean
        projected = centred @ self.components.T
        residual = np.maximum(np.sum(centred**2, axis=1) - np.sum(projected**2, axis=1), 0.0)
        squared = np.sum(projected**2 / self.variances, axis=1) + residual / self.noise_variance
        return np.sqrt(squared / self.mean.shape[0])

    def arrays(self) -> dict[str, np.ndarray]:
        """The tensors to store (a bundle keeps them in safetensors)."""
        return {
            "mean": self.mean.astype(np.float32),
            "components": self.components.astype(np.float32),
            "variances": self.variances.astype(np.float64),
            "noise_variance": np.array([self.noise_variance], dtype=np.float64),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], threshold: float, quantile: float) -> FeatureDensity:
        return cls(
            mean=np.asarray(arrays["mean"], dtype=np.float64),
            components=np.asarray(arrays["components"], dtype=np.float64),
            variances=np.asarray(arrays["variances"], dtype=np.float64),
            noise_variance=float(np.asarray(arrays["noise_variance"]).reshape(-1)[0]),
            threshold=float(threshold),
            quantile=float(quantile),
        )


def fit_density(X: np.ndarray, n_components: int = DEFAULT_COMPONENTS) -> FeatureDensity:
    """Probabilistic PCA of ``X`` (N, D): mean, top-k directions and variances, noise variance."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or len(X) < 3:
        raise LeukotypeError(f"the OOD model needs at least 3 training rows, got shape {X.shape}")
    n, dim = X.shape
    mean = X.mean(axis=0)
    from threadpoolctl import threadpool_limits

    # One BLAS thread: the matrices are small, and multi-threaded OpenBLAS spins badly on a
    # shared, loaded node (measured: 15 s instead of 0.2 s for 240 x 1280).
    with threadpool_limits(limits=1, user_api="blas"):
        _, singular, vt = np.linalg.svd(X - mean, full_matrices=False)
    eigen = singular**2 / (n - 1)
    k = int(max(1, min(n_components, n - 2, dim - 1)))
    rest = eigen[k:]
    # Remaining variance spread over the remaining D - k dimensions (PPCA's ML estimate).
    noise = float(rest.sum() / (dim - k)) if dim > k else 0.0
    floor = max(float(eigen[0]) * 1e-9, 1e-12)
    noise = max(noise, floor)
    variances = np.maximum(eigen[:k], noise)
    return FeatureDensity(mean=mean, components=vt[:k], variances=variances, noise_variance=noise)


def fit_ood(
    X: np.ndarray,
    groups: Sequence[str],
    quantile: float = DEFAULT_QUANTILE,
    n_components: int = DEFAULT_COMPONENTS,
    n_folds: int = 3,
    seed: int = 0,
) -> FeatureDensity:
    """Density of all training rows with the flag threshold set on out-of-fold distances."""
    if not 0.0 < quantile < 1.0:
        raise LeukotypeError(f"OOD quantile must be in (0, 1), got {quantile}")
    X = np.asarray(X, dtype=np.float64)
    groups = np.asarray(groups).astype(str)
    names = np.unique(groups)
    if len(names) < 2:
        raise LeukotypeError("the OOD threshold needs training rows from at least 2 groups")
    rng = np.random.default_rng(seed)
    fold_of_group = dict(zip(rng.permutation(names), np.arange(len(names)) % min(n_folds, len(names))))
    fold = np.array([fold_of_group[g] for g in groups])
    distances = np.empty(len(X))
    for k in np.unique(fold):
        held = fold == k
        distances[held] = fit_density(X[~held], n_components).distance(X[held])
    density = fit_density(X, n_components)
    threshold = float(np.quantile(distances, quantile))
    return FeatureDensity(
        density.mean, density.components, density.variances, density.noise_variance, threshold, quantile
    )
