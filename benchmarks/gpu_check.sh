#!/usr/bin/env bash
# The step benchmarks on a GPU, as one short run (issue 13: bf16 MFU of `base` and the largest batch
# that fits; the VAE step). Run from the repository root on a machine with a CUDA GPU and PyTorch:
#
#   bash benchmarks/gpu_check.sh [OUT]          # OUT: where the tables go (default /tmp/gpu_check)
#   GPU_CHECK_PARTS=vae bash benchmarks/gpu_check.sh    # only some parts (default: "pretrain vae",
#                                                       # in the order: base:32, VAE, small batches;
#                                                       # "profile": base's kernels at batch 128)
#
# Needs the project's imports but not Ray, Prefect or DVC (the step benchmarks import no driver code).
# Optional, from the repository root:
#   .whl/         wheels of what the machine lacks (installed into /tmp/site, nothing else touched);
#   .devbench/ref a folder laid out like ../shared/bench/setup_ref.sh's (src/pretrain: the authors' code)
#                 and .devbench/ref_step.py, the shared harness with a --device flag: then the authors'
#                 step runs beside the project's, alternating, under the same bf16 autocast.
# Neither is part of the project. Each part runs on if an earlier one fails.
set -uo pipefail
out=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$out"
root=$(pwd)
export PYTHONUNBUFFERED=1 PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
reference=()
if [ -d .devbench/ref/src/pretrain ] && [ -f .devbench/ref_step.py ]; then
    reference=(--reference "$root/.devbench/ref" --harness "$root/.devbench/ref_step.py")
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"
cd benchmarks || exit 1
# when each part starts and ends (the lease's minutes are few: the next run's plan needs the split)
mark() { echo "$(date -u +%T) $*" | tee -a "$out/times.txt"; }
parts=" ${GPU_CHECK_PARTS:-pretrain vae} "
if [[ $parts == *" pretrain "* ]]; then
    # base at the batch a training run would use, beside the authors' step; then doubling to the memory limit.
    mark "start pretrain_step_gpu"
    python3 pretrain_step.py --devices cuda --presets base:32 --steps 10 --repeats 2 --max-batch "${reference[@]}" \
        2>&1 | tee "$out/pretrain_step_gpu.txt"
    mark "end pretrain_step_gpu"
fi
if [[ $parts == *" vae "* ]]; then
    # the VAE step: the demo's tiny preset and the published MAISI shape on 64^3 crops.
    mark "start vae_step_gpu"
    python3 vae_step.py --devices cuda --presets tiny:2 maisi:2 --crop 64 --steps 10 --repeats 2 \
        2>&1 | tee "$out/vae_step_gpu.txt"
    mark "end vae_step_gpu"
fi
if [[ $parts == *" pretrain "* ]]; then
    # the CPU comparison's batch (launch-bound on a GPU) and the demo's small preset: last, as the least needed.
    mark "start pretrain_step_gpu_small_batches"
    python3 pretrain_step.py --devices cuda --presets base:2 small:8 --steps 10 --repeats 2 "${reference[@]}" \
        2>&1 | tee "$out/pretrain_step_gpu_small_batches.txt"
    mark "end pretrain_step_gpu_small_batches"
fi
if [[ $parts == *" profile "* ]]; then
    # where base's step spends GPU time once the GPU, not the host, is the limit
    mark "start pretrain_profile_gpu"
    python3 pretrain_step.py --devices cuda --presets base:128 --steps 5 --profile \
        2>&1 | tee "$out/pretrain_profile_gpu.txt"
    mark "end pretrain_profile_gpu"
fi
