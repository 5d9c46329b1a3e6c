"""Linear probes: how much of a label (e.g. the site) a feature set carries, against its own null.

scikit-learn does the work: a ``StandardScaler`` + multinomial ``LogisticRegression``
pipeline, stratified k-fold cross-validation, ``permutation_test_score`` for the null and
``PCA`` for figures. With a few volumes per site the cross-validated accuracy of a probe
on label-free features is not ``1/K``: small folds, class imbalance within folds and
fitting noise move it. The permutation null (the same probe, the same folds, the labels
shuffled) is the reference a score has to beat.
"""

from __future__ import annotations

import numpy as np
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from scipy.stats import binomtest
from sklearn.model_selection import StratifiedKFold, cross_val_predict, permutation_test_score
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler


def linear_probe(l2: float, samples: int, max_iter: int = 200) -> Pipeline:
    """Standardise, then multinomial logistic regression minimising ``mean CE + l2/2 ||W||²``.

    scikit-learn minimises ``C · sum CE + ||W||² / 2``; ``C = 1 / (l2 · samples)`` makes the
    penalty per sample independent of how many samples a fold holds (approximately: a
    fold trains on ``(k-1)/k`` of ``samples``).
    """
    c = 1.0 / (max(l2, 1e-12) * max(samples, 1))
    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))


def probe_folds(y: np.ndarray, folds: int, seed: int) -> StratifiedKFold:
    """Stratified folds, at most as many as the rarest class has samples (each fold sees every class)."""
    counts = np.unique(y, return_counts=True)[1]
    if len(counts) < 2 or counts.min() < 2:
        raise ValueError(f"cross-validation needs 2 classes with at least 2 samples each, got counts {counts.tolist()}")
    smallest = int(counts.min())
    return StratifiedKFold(n_splits=min(folds, smallest), shuffle=True, random_state=seed)


def site_probe(x: np.ndarray, y: np.ndarray, *, folds: int = 5, l2: float = 1e-2, max_iter: int = 200,
               permutations: int = 200, seed: int = 0, jobs: int | None = None) -> dict:
    """Cross-validated probe accuracy of ``x (n, F)`` for labels ``y (n,)`` and its permutation null.

    ``jobs`` processes share the permutations (joblib; None: one); the null does not depend on it.

    Returns:
        ``accuracy_mean``/``accuracy_std``/``fold_accuracies``/``folds``, ``correct``/``samples`` and
        ``ci95`` (Wilson interval of the pooled out-of-fold accuracy); with
        ``permutations > 0`` also ``null_mean``, ``null_p95`` (95th percentile) and ``p_value``
        (``(1 + #null ≥ score) / (1 + permutations)``, scikit-learn's definition).
    """
    cv = probe_folds(y, folds, seed)
    probe = linear_probe(l2, len(y), max_iter)
    predicted = cross_val_predict(probe, x, y, cv=cv)  # each sample predicted by the fold that held it out
    scores = np.array([(predicted[test] == y[test]).mean() for _, test in cv.split(x, y)])
    correct = int((predicted == y).sum())
    result = {"accuracy_mean": float(scores.mean()), "accuracy_std": float(scores.std()),
              "fold_accuracies": [float(s) for s in scores], "folds": cv.get_n_splits(), "correct": correct,
              "samples": len(y), "ci95": proportion_ci(correct, len(y))}
    if permutations > 0:
        _, null, p_value = permutation_test_score(probe, x, y, cv=cv, n_permutations=permutations,
                                                  random_state=seed, scoring="accuracy", n_jobs=jobs)
        result.update({"permutations": permutations, "null_mean": float(null.mean()),
                       "null_p95": float(np.percentile(null, 95)), "p_value": float(p_value),
                       "above_null_p95": bool(scores.mean() > np.percentile(null, 95))})
    return result


def proportion_ci(successes: int, trials: int) -> list[float]:
    """95 % Wilson interval ``[low, high]`` of a proportion (``[0, 1]`` without trials)."""
    if trials == 0:
        return [0.0, 1.0]
    interval = binomtest(successes, trials).proportion_ci(0.95, method="wilson")
    return [float(interval.low), float(interval.high)]


def fit_probe(x: np.ndarray, y: np.ndarray, l2: float = 1e-2, max_iter: int = 200) -> Pipeline:
    """One probe fit on every sample (``.predict(x)`` gives labels)."""
    return linear_probe(l2, len(y), max_iter).fit(x, y)


def pca_2d(x: np.ndarray) -> np.ndarray:
    """First two principal-component scores of standardised ``x (n, F)``: ``(n, 2)`` (0-padded)."""
    xs = StandardScaler().fit_transform(x)
    scores = PCA(n_components=min(2, *xs.shape), svd_solver="full").fit_transform(xs)
    return np.pad(scores, [(0, 0), (0, 2 - scores.shape[1])])
