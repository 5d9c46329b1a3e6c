"""Whole-volume VAE encode and decode with and without MAISI tensor splitting: time and peak memory.

``meduet.models.vae.encode_volume`` / ``decode_latent`` split a volume into chunks whenever it
holds more input voxels than ``max_voxels_per_split`` (``num_splits_for``). This times one
volume of ``--shape`` voxels with the preset's random weights (time does not depend on them)
for each bound given, encode and decode each in its own process (clean peak RSS), the bounds
alternating ``--repeats`` times; prints the split count, best-of-3 seconds and peak RSS per
row, the ratio against the first bound, and the largest difference of the outputs from the
first bound's (splitting is exact up to float rounding).

    python benchmarks/vae_split.py [--shape 112 176 224] [--bounds 4000000 16000000] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import torch
from machine import cpu_flags, cpu_name, peak_rss_gib, run_json_row, spread  # benchmarks/machine.py (this folder)

from meduet.models.architectures import VAE_PRESETS
from meduet.models.vae import build_vae, decode_latent, encode_volume, num_splits_for


def row(preset: str, shape: tuple[int, int, int], bound: int, direction: str, output: Path) -> dict:
    """One process: ``direction`` (encode | decode) of one volume, best of 3 after a warm-up."""
    torch.manual_seed(0)
    vae = build_vae(VAE_PRESETS[preset]).eval()
    generator = torch.Generator().manual_seed(0)
    if direction == "encode":
        volume = torch.rand(1, 1, *shape, generator=generator)
        run = lambda: encode_volume(vae, volume, bound)[0]  # noqa: E731 - posterior mean (1, 4, d, h, w)
    else:
        latent = torch.randn(1, 4, *(n // 4 for n in shape), generator=generator)
        run = lambda: decode_latent(vae, latent, bound)  # noqa: E731 - (1, 1, D, H, W)
    result = run()
    seconds = []
    for _ in range(3):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    torch.save(result, output)
    return {"seconds": min(seconds), "peak_gib": peak_rss_gib(), "splits": num_splits_for(shape, bound)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=[112, 176, 224], help="volume (D, H, W), multiples of 4")
    parser.add_argument("--bounds", type=int, nargs="+", default=[4_000_000, 16_000_000])
    parser.add_argument("--preset", default="tiny", choices=sorted(VAE_PRESETS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--row", nargs=3, help=argparse.SUPPRESS)  # bound direction output: one child row
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = tuple(args.shape)
    if args.row:
        bound, direction, output = args.row
        print(json.dumps(row(args.preset, shape, int(bound), direction, Path(output))))
        return

    folder = Path(tempfile.mkdtemp(prefix="meduet-vae-split-"))
    rows: dict[tuple[str, int], list[dict]] = {}
    for _ in range(args.repeats):
        for direction in ("encode", "decode"):
            for bound in args.bounds:
                command = [sys.executable, __file__, "--shape", *map(str, shape), "--preset", args.preset,
                           "--threads", str(args.threads),
                           "--row", str(bound), direction, str(folder / f"{direction}_{bound}.pt")]
                rows.setdefault((direction, bound), []).append(run_json_row(command))

    print(f"# {cpu_name()} ({', '.join(cpu_flags())}); {args.threads} thread(s); preset {args.preset}; "
          f"volume {' x '.join(map(str, shape))}; {args.repeats} processes per row, best of 3 in each")
    print("| pass | bound (voxels) | splits | s, median (range) | peak RSS GiB | ratio | max abs difference |")
    print("|---|---|---|---|---|---|---|")
    for direction in ("encode", "decode"):
        first = torch.load(folder / f"{direction}_{args.bounds[0]}.pt", weights_only=True)
        baseline = median(r["seconds"] for r in rows[(direction, args.bounds[0])])
        for bound in args.bounds:
            found = rows[(direction, bound)]
            seconds = [r["seconds"] for r in found]
            difference = (torch.load(folder / f"{direction}_{bound}.pt", weights_only=True) - first).abs().max()
            peak = max(r["peak_gib"] for r in found)
            print(f"| {direction} | {bound:,} | {found[0]['splits']} | {spread(seconds)} | {peak:.2f} | "
                  f"{median(seconds) / baseline:.2f}x | {float(difference):.2g} |")


if __name__ == "__main__":
    main()
