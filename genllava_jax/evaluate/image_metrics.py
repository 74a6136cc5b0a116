"""Generation and editing metrics from image/text features computed by any encoder (our SigLIP can serve).

Numbers are comparable across runs only with the same encoder: the published CLIP score uses CLIP ViT-L/14, FID
pytorch-fid's Inception-v3 pool3 features (`models/inception.py`), the DINO score DINO ViT-S/16 [CLS] features
(`models/dino.py`). All inputs are (N, D) arrays.
"""

from __future__ import annotations

import numpy as np


def _pairs(a, b, what: str) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"{what}: expected two (N, D) arrays of one shape, got {a.shape} and {b.shape}")
    if len(a) == 0:
        raise ValueError(f"{what}: no features")
    return a, b


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def clip_scores(image_feats, text_feats) -> np.ndarray:
    """100·cos(image_i, text_i) of each pair (N,): e.g. to filter generated images by their prompt."""
    a, b = _pairs(image_feats, text_feats, "clip_scores")
    return 100 * _cosine(a, b)


def clip_score(image_feats, text_feats) -> float:
    """CLIP score as torchmetrics computes it: max(mean over pairs of 100·cos(image_i, text_i), 0).

    torchmetrics clamps the *mean* at zero (its docstring writes the clamp per pair, its code does not).
    """
    return float(max(np.mean(clip_scores(image_feats, text_feats)), 0.0))


def dino_score(feats_a, feats_b) -> float:
    """Mean cosine similarity of paired image features (DreamBooth's DINO score: generated vs reference image)."""
    a, b = _pairs(feats_a, feats_b, "dino_score")
    return float(np.mean(_cosine(a, b)))


def gaussian_stats(feats) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of (N, D) features, as FID implementations fit them."""
    x = np.asarray(feats, np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"gaussian_stats: expected (N >= 2, D) features, got shape {x.shape}")
    return x.mean(0), np.cov(x, rowvar=False)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu_a, sigma_a, mu_b, sigma_b) -> float:
    """|mu_a - mu_b|² + tr(Σa + Σb - 2 (Σa Σb)^½), as pytorch-fid's calculate_frechet_distance.

    tr (Σa Σb)^½ is the sum of the singular values of Σa^½ Σb^½ (their squares are the eigenvalues of Σa Σb), with
    symmetric eigensolves for the roots: real and stable for singular covariances (fewer samples than dimensions),
    where scipy's general `sqrtm` needs an epsilon and complex clean-up, and where the square roots of rounding-level
    eigenvalues would otherwise add up (a set against itself gives 0 to rounding).
    """
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    sigma_a = np.atleast_2d(np.asarray(sigma_a, np.float64))
    sigma_b = np.atleast_2d(np.asarray(sigma_b, np.float64))
    tr_covmean = np.sum(np.linalg.svd(_psd_sqrt(sigma_a) @ _psd_sqrt(sigma_b), compute_uv=False))
    d = mu_a - mu_b
    return float(d @ d + np.trace(sigma_a) + np.trace(sigma_b) - 2 * tr_covmean)


def fid(feats_a, feats_b) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N_a and N_b may differ; D must agree).

    With fewer samples than dimensions the same quantities come from the samples (no D x D matrix): tr Σ is the
    centred features' squared norm over N - 1, and tr (Σa Σb)^½ the sum of the singular values of Xa Xbᵀ (N_a x N_b)
    over sqrt((N_a - 1)(N_b - 1)), since that matrix times its transpose has the nonzero eigenvalues of Σa Σb.
    """
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"fid: expected (N, D) arrays with one D, got {a.shape} and {b.shape}")
    if max(len(a), len(b)) >= a.shape[1]:
        return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))
    gaussian_stats(a), gaussian_stats(b)  # the same shape checks
    xa, xb = a - a.mean(0), b - b.mean(0)
    na, nb = len(a) - 1, len(b) - 1
    tr_covmean = np.sum(np.linalg.svd(xa @ xb.T, compute_uv=False)) / np.sqrt(na * nb)
    d = a.mean(0) - b.mean(0)
    return float(d @ d + np.sum(xa * xa) / na + np.sum(xb * xb) / nb - 2 * tr_covmean)
