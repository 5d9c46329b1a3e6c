"""Linear probes: how much of a label (e.g. the site) a feature set carries, cross-validated.

A multinomial logistic regression on standardised features, fit with L-BFGS in float64, and
stratified k-fold cross-validation of its accuracy; plus a 2-D PCA for figures.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class LinearProbe:
    """Multinomial logistic regression on standardised features: ``softmax(W ((x - mu) / sd) + b)``."""

    mean: np.ndarray  # (F,)
    std: np.ndarray  # (F,)
    weight: np.ndarray  # (K, F)
    bias: np.ndarray  # (K,)

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, num_classes: int, l2: float = 1e-2,
            max_iter: int = 200) -> LinearProbe:
        """Minimise ``mean CE + l2/2 ||W||²`` over ``x (n, F)``, labels ``y (n,)`` in ``0..K-1``."""
        mean = x.mean(0)
        std = x.std(0)
        std = np.where(std > 1e-8, std, 1.0)  # a constant feature stays 0 after standardising
        xs = torch.from_numpy((x - mean) / std).double()  # (n, F)
        yt = torch.from_numpy(np.asarray(y)).long()
        weight = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
        bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9,
                                      tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(xs @ weight.T + bias, yt) + 0.5 * l2 * weight.pow(2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        return cls(mean, std, weight.detach().numpy(), bias.detach().numpy())

    def logits(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.std) @ self.weight.T + self.bias  # (n, K)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.logits(x).argmax(1)


def stratified_folds(y: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """Fold index ``(n,)`` for each sample: each class shuffled, then dealt round-robin.

    Dealing the classes one after another from a running counter keeps both the class
    proportions and the fold sizes within one sample of even.
    """
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), dtype=np.int64)
    counter = 0
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        fold[members] = (counter + np.arange(len(members))) % folds
        counter += len(members)
    return fold


def cross_validate(x: np.ndarray, y: np.ndarray, num_classes: int, folds: int = 5, l2: float = 1e-2,
                   max_iter: int = 200, seed: int = 0) -> dict:
    """Accuracy of a ``LinearProbe`` over stratified folds (``folds`` capped at the sample count)."""
    folds = min(folds, len(y))
    if folds < 2:
        raise ValueError(f"cross-validation needs at least 2 samples, got {len(y)}")
    fold = stratified_folds(y, folds, seed)
    accuracies = []
    for k in range(folds):
        test = fold == k
        probe = LinearProbe.fit(x[~test], y[~test], num_classes, l2, max_iter)
        accuracies.append(float((probe.predict(x[test]) == y[test]).mean()))
    return {"accuracy_mean": float(np.mean(accuracies)), "accuracy_std": float(np.std(accuracies)),
            "fold_accuracies": accuracies, "folds": folds}


def pca_2d(x: np.ndarray) -> np.ndarray:
    """First two principal-component scores of standardised ``x (n, F)``: ``(n, 2)``."""
    std = x.std(0)
    xs = (x - x.mean(0)) / np.where(std > 1e-8, std, 1.0)
    _, _, vt = np.linalg.svd(xs, full_matrices=False)
    scores = xs @ vt[:2].T
    return np.pad(scores, [(0, 0), (0, 2 - scores.shape[1])])  # fewer than 2 components: pad with 0
