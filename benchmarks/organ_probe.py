"""How much organ anatomy each initialisation's encoder tokens carry, read by a linear probe from few labels.

The fine-tuning sweep asks whether MeDUET makes segmentation learn from fewer labels, but in
its 300 steps the segmentation head (a latent stem and an image-resolution refinement) does
most of the work whatever the encoder started from (README: analysis). This script asks the
narrower question of the representation itself, with no head to train: tokens of the frozen
encoders, each labelled with the organ that fills most of its image box, a linear probe
(``meduet.engine.probes.linear_probe``: standardise, multinomial logistic regression) fitted
on the tokens of the labelled training subjects (``labels_per_site`` per site, chosen per seed
as the sweep chooses them, ``finetune_runs.labelled_cases``), scored on every token of the
held-out subjects. Feature sets, the same tokens for each:

- ``latent``: the scaled VAE latent under the token's patch (``C x p^3`` values): what any
  encoder starts from, the control a pretraining has to beat;
- ``scratch``: the encoder's tokens with random weights (seeded as a scratch fine-tuning is);
- ``mae``: the masked-autoencoder baseline's encoder (``models/pretrain_mae``, EMA weights);
- ``meduet`` and ``meduet_content``: MeDUET's encoder tokens and their content factor
  (``models/pretrain``, EMA weights, as fine-tuning loads them).

Scores per (feature set, labels per site, seed): token Dice per organ (F1 of the class over
held-out tokens, ``sklearn.metrics.f1_score``), their mean over the organs present in the
held-out truth, and balanced accuracy over all classes. A token's image box is ``4p`` voxels
on a side (``p`` the patch, 4 the VAE's downsampling), so small organs own few tokens.

    python benchmarks/organ_probe.py [--params params.yaml] [--labels 1 2 all] [--seeds 0 1 2] [--json out.json]
        [--encoder NAME=PATH ...]

``--encoder`` adds the EMA tokens of other pretrained files (e.g. a recipe ablation's
``<work>/ablation/<variant>-seed0/models/pretrain/meduet.pt``) as feature sets ``NAME``.

Needs the store of a ``make run`` (latents, harmonized labels, ``models/pretrain`` and
``models/pretrain_mae``).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from machine import describe  # benchmarks/machine.py (this script's folder)
from sklearn.metrics import balanced_accuracy_score, f1_score

from meduet.artifacts.pretrained import load_meduet, meduet_path
from meduet.config import Paths, load_config
from meduet.data.windows import box_fractions, sliding_windows, window_origins
from meduet.engine.finetune_runs import head_architecture, labelled_cases, segmentation_data
from meduet.engine.finetune_training import read_case
from meduet.engine.probes import linear_probe
from meduet.models.meduet import MeduetModel

BUILT_IN = ("latent", "scratch", "mae", "meduet", "meduet_content")


def token_labels(label: np.ndarray, origins: np.ndarray, box: int, classes: int) -> np.ndarray:
    """The class filling most of each token's image box: ``(n,)`` for box origins ``origins (n, 3)`` (ties: the
    lower class)."""
    shares = np.stack([box_fractions(label == c, origins, (box,) * 3) for c in range(classes)], axis=1)  # (n, K)
    return shares.argmax(axis=1)


@torch.no_grad()
def volume_tokens(latent: np.ndarray, encoders: dict[str, MeduetModel]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Feature rows per token of a whole latent ``(C, d, h, w)``, tiled by the encoders' window (``sliding_windows``).

    A token whose latent origin an earlier window already gave is left out (the last window of an
    axis overlaps its neighbour), so each patch counts once.

    Returns:
        ``{"latent": (n, C * p^3), <encoder>: (n, E) ...}`` plus ``meduet_content`` when ``meduet`` is
        among the encoders, and the tokens' latent origins ``(n, 3)``.
    """
    config = next(iter(encoders.values())).config
    window, p = tuple(config.input_size), config.patch_size
    windows = sliding_windows(torch.from_numpy(latent), window)  # (n, C, d, h, w)
    grid = np.stack(np.meshgrid(*[np.arange(0, k, p) for k in window], indexing="ij"), axis=-1).reshape(-1, 3)
    origins = (window_origins(latent.shape[1:], window)[:, None] + grid[None]).reshape(-1, 3)  # tokens' order
    _, first = np.unique(origins, axis=0, return_index=True)
    keep = np.sort(first)
    patches = rearrange(windows, "n c (a p1) (b p2) (e p3) -> (n a b e) (c p1 p2 p3)", p1=p, p2=p, p3=p)
    rows = {"latent": patches[keep].numpy()}
    for name, encoder in encoders.items():
        # One window per forward, as docs/results/organ_probe_*.txt were made: a batch of all windows sums in
        # another order and moves the token Dice by up to 0.002.
        tokens = torch.cat([encoder.encode_tokens(encoder.embed(w[None]))[1] for w in windows])  # (n, N, E)
        rows[name] = tokens.flatten(0, 1)[keep].numpy()
        if name == "meduet":
            rows["meduet_content"] = encoder.factorize(tokens)[0].flatten(0, 1)[keep].numpy()
    return rows, origins[keep]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--labels", nargs="+", default=["1", "2", "all"], help="labelled subjects per site")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--l2", type=float, default=1e-3, help="the probe's L2 penalty per sample")
    parser.add_argument("--max-iter", type=int, default=500)
    parser.add_argument("--json", type=Path, help="write every score here")
    parser.add_argument("--encoder", action="append", default=[], metavar="NAME=PATH",
                        help="another pretrained file (meduet.pt) whose EMA tokens are a feature set")
    args = parser.parse_args()
    torch.set_num_threads(2)
    # A probe may predict an organ the held-out truth lacks (lesion, a kidney): scored as it is, no news.
    warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
    started = time.perf_counter()
    cfg = load_config(args.params)
    paths = Paths.resolve(cfg, Path(args.params).resolve().parent)
    names = cfg.finetune.label_names
    data = segmentation_data(paths, cfg.harmonize, names)
    train, held_out = data.split("train"), data.split("held_out")
    pretrained = {init: load_meduet(meduet_path(paths, stage), "teacher")[0]
                  for init, stage in (("meduet", "pretrain"), ("mae", "pretrain_mae"))}
    for item in args.encoder:
        name, _, file = item.partition("=")
        if not file or name in BUILT_IN:
            raise SystemExit(f"--encoder {item!r}: give NAME=PATH with a name other than {BUILT_IN}")
        pretrained[name] = load_meduet(Path(file), "teacher")[0]
    feature_sets = [*BUILT_IN, *(name for name in pretrained if name not in BUILT_IN)]
    factor = head_architecture(cfg.finetune).downsample  # image voxels per latent voxel
    box = factor * pretrained["meduet"].config.patch_size

    volumes = {}  # key -> (feature rows, token labels, latent); scratch's rows come per seed
    for record in train + held_out:
        latent, _, label = read_case(data.files(paths, record), data.scale)
        rows, origins = volume_tokens(latent, pretrained)
        volumes[record.key] = (rows, token_labels(label, origins * factor, box, len(names)), latent)

    def with_scratch(seed: int) -> dict[str, tuple[dict[str, np.ndarray], np.ndarray]]:
        torch.manual_seed(seed)  # scratch: a random encoder per seed, as a scratch fine-tuning draws one
        scratch = {"scratch": MeduetModel(pretrained["meduet"].config).eval()}
        return {key: ({**rows, "scratch": volume_tokens(latent, scratch)[0]["scratch"]}, labels)
                for key, (rows, labels, latent) in volumes.items()}

    results = []
    print(describe())
    print(f"store: {len(train)} training and {len(held_out)} held-out volumes; token box {box}^3 image voxels")
    print(f"{'features':>15} {'labels':>6} {'seed':>4} {'tokens':>7} {'token Dice':>10} {'bal. acc':>8}  per organ")
    by_seed = {seed: with_scratch(seed) for seed in args.seeds}
    fitted: dict[tuple, np.ndarray] = {}
    for per_site in args.labels:
        for seed in args.seeds:
            cases = by_seed[seed]
            labelled = [r.key for r in labelled_cases(train, per_site if per_site == "all" else int(per_site), seed)]
            y_train = np.concatenate([cases[k][1] for k in labelled])
            y_test = np.concatenate([cases[r.key][1] for r in held_out])
            organs = [c for c in range(1, len(names)) if (y_test == c).any()]
            for name in feature_sets:
                # Only the random encoder's tokens change with the seed: a pretrained set labelled alike
                # (e.g. all labels) fits the same deterministic probe, so it is fitted once.
                key = (name, seed if name == "scratch" else None, tuple(labelled))
                if key not in fitted:
                    x_train = np.concatenate([cases[k][0][name] for k in labelled])
                    x_test = np.concatenate([cases[r.key][0][name] for r in held_out])
                    probe = linear_probe(args.l2, len(y_train), args.max_iter).fit(x_train, y_train)
                    fitted[key] = probe.predict(x_test)
                predicted = fitted[key]
                dice = f1_score(y_test, predicted, labels=organs, average=None, zero_division=0.0)
                row = {"features": name, "labels_per_site": per_site, "seed": seed, "train_tokens": len(y_train),
                       "labelled": labelled, "token_dice": float(dice.mean()),
                       "balanced_accuracy": float(balanced_accuracy_score(y_test, predicted)),
                       "per_organ": {names[c]: round(float(d), 4) for c, d in zip(organs, dice)}}
                results.append(row)
                print(f"{name:>15} {per_site:>6} {seed:>4} {len(y_train):>7} {row['token_dice']:>10.3f} "
                      f"{row['balanced_accuracy']:>8.3f}  " + " ".join(f"{d:.2f}" for d in dice))
    print(f"\nmean ± sd over seeds {args.seeds} (token Dice: mean over the {len(organs)} organs of the held-out "
          f"truth; differences paired by seed)")
    header = " ".join(f"{n:>16}" for n in feature_sets)
    print(f"{'labels':>6} {header} {'meduet - mae':>14} {'meduet - latent':>16}")
    for per_site in args.labels:
        scores = {n: np.array([r["token_dice"] for r in results if r["features"] == n
                               and r["labels_per_site"] == per_site]) for n in feature_sets}
        cells = " ".join(f"{scores[n].mean():>9.3f} ± {scores[n].std(ddof=1) if len(scores[n]) > 1 else 0:.3f}"
                         for n in feature_sets)
        print(f"{per_site:>6} {cells} {(scores['meduet'] - scores['mae']).mean():>+14.3f} "
              f"{(scores['meduet'] - scores['latent']).mean():>+16.3f}")
    print(f"\n{time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"machine": describe(), "args": vars(args) | {"json": str(args.json)},
                                         "rows": results}, indent=1))


if __name__ == "__main__":
    main()
