"""3-D SSIM of whole volumes: ``monai.metrics.SSIMMetric`` against this project's ``ssim_3d``.

``evaluate-synthesis`` scores every translation and its baselines against the real scan with a
3-D SSIM on whole volumes. MONAI convolves five local statistics with the full Gaussian window
(k³ taps); ``meduet.evaluation.synthesis.ssim_3d`` applies the same window as three 1-D filters
(3k taps). Both are timed here in one process, alternately, on the same pair of volumes, with the
largest difference of their values.

    python benchmarks/ssim.py [--shape 112 176 224] [--windows 7 11] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch
from machine import describe  # benchmarks/machine.py (this script's folder)
from monai.metrics import SSIMMetric

from meduet.evaluation.synthesis import ssim_3d


def _seconds(fn, repeats: int) -> tuple[float, float]:
    """Best time of ``repeats`` calls and the value of the last one."""
    best, value = float("inf"), float("nan")
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - start)
    return best, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[112, 176, 224],
                        help="voxels (D H W); default: a harmonized demo volume")
    parser.add_argument("--windows", type=int, nargs="+", default=[7, 11])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    target = torch.rand(1, 1, *args.shape, generator=generator)
    estimate = (target + 0.1 * torch.randn(1, 1, *args.shape, generator=generator)).clamp(0, 1)
    print(f"# {describe()}; volume {'x'.join(map(str, args.shape))}, best of {args.repeats}")
    print("| window | MONAI SSIMMetric s | ssim_3d s | ratio (ssim_3d / MONAI) | |difference| |")
    print("|---|---|---|---|---|")
    for window in args.windows:
        metric = SSIMMetric(spatial_dims=3, data_range=1.0, win_size=window)
        monai_s, monai_value = _seconds(lambda: float(metric(estimate, target).mean()), args.repeats)
        ours_s, ours_value = _seconds(lambda: ssim_3d(estimate, target, data_range=1.0, win_size=window),
                                      args.repeats)
        print(f"| {window} | {monai_s:.2f} | {ours_s:.3f} | {ours_s / monai_s:.3f} | "
              f"{abs(ours_value - monai_value):.1e} |")


if __name__ == "__main__":
    main()
