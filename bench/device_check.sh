#!/usr/bin/env bash
# Everything a GPU session checks, in one run, most important first (each stage writes under $OUT, default
# ./device-check): build the CUDA extension, the reproductions of the ahead-of-time audit (issue 14: cuSOLVER's
# eigenvector layout in the batched path, float64 Triton accuracy, grid and 2^31 limits, a second device, QE's
# weights without a sync), the other GPU tests (every CUDA op, the eigensolver and whole
# trajectories against the reference), bench/gpu_check.py (accuracy and timing tables, and the dispatch table
# measured on this GPU for KLDWRM_DISPATCH_TABLE), then the step-time
# suite on the paper CNN and the MLP at the 10/100 cadence (the issue's GPU targets), and the host time and
# operation count of a plain step (what bounds a launch-bound small model), exact against warm eigenbases, the race
# on the MLP workload, and last the floor table.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-device-check}
mkdir -p "$out"
export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0+PTX}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
# pyproject.toml's license string needs setuptools 77 or newer; the image's version is not listed anywhere.
python -c "import setuptools, torch, triton; print('setuptools', setuptools.__version__, 'torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
{ time pip install --no-build-isolation --no-deps -e . ; } > "$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }
python -m pytest -q -rs tests/ops/test_gpu_audit.py 2>&1 | tail -30 | tee "$out/gpu_audit.txt"
python -m pytest -q -m gpu tests --ignore=tests/ops/test_gpu_audit.py 2>&1 | tail -30 | tee "$out/gpu_tests.txt"
python bench/gpu_check.py --json "$out/gpu_check.json" --tune "$out/dispatch_table.json" 2>&1 | tee "$out/gpu_check.txt"
python -m pytest bench/test_step_time.py --benchmark-only -q -k "10/100 and (paper-cnn or mlp)" \
  --benchmark-json "$out/step_time.json" 2>&1 | tail -60 | tee "$out/step_time.txt"
# (the compiled steps after a training batch left out: four more compilations, and the issue's measure is batch 2)
python -m pytest bench/test_host_overhead.py --benchmark-only -q -k "not (compiled and training)" \
  --benchmark-json "$out/host_overhead.json" 2>&1 | tail -40 | tee "$out/host_overhead.txt"
# Warm-started eigenbases and low-rank sides (issue 35): exact (torch, cuSOLVER) against orthogonal iteration and
# the rank-16/64 range finder per size group, then the MLP's iteration time at every step and 10/100 with exact,
# warm and rank-64 sides, interleaved.
timeout 90 python bench/warm_eigh.py --sizes 256,512,1024,2048,4096 --batch 1,8 --ranks 16,64 \
  --json "$out/warm_eigh.json" 2>&1 | tail -14 | tee "$out/warm_eigh.txt"
for cadence in every-step 10/100; do
  timeout 60 python bench/compare_step_time.py --workload mlp --cadence "$cadence" --repeats 3 \
    --entries kfac-cuda,kfacwarm-cuda,kfacwarm0-cuda,kfacrank64-cuda,q-cuda,qwarm-cuda --json "$out/warm-mlp-${cadence//\//_}.json" \
    2>&1 | tail -7 | tee "$out/warm-mlp-${cadence//\//_}.txt"
done
# The race (issue 33) on the GPU, sized for its time (about 26 runs of the MLP workload): K-FAC and Q against AdamW
# and SOAP (heavyball, when the image has it; otherwise its row says missing), one run after the other; heavyball
# compiles its steps on CUDA (its compile time reported apart).
timeout 240 python -W ignore bench/race.py --workloads mlp --optimizers kfac,q,adamw,soap --jobs 1 \
  --out "$out/race" 2>&1 | tail -50 | tee "$out/race.txt"
# Last (it may be cut by the run's time limit; each cell stops after 30 s, and its JSON keeps the rounds it
# finished): the nine cells against the linear-algebra floor with backend="auto" (issue 17's GPU target:
# ours / (SGD + floor) <= 1.10).
for workload in paper-cnn mlp wide-cnn; do
  for cadence in every-step 10/100 30/30; do
    name="floor-$workload-${cadence//\//_}"
    timeout 30 python bench/floor.py --workload "$workload" --cadence "$cadence" --repeats 3 \
      --json "$out/$name.json" 2>&1 | tail -4 | tee "$out/$name.txt"
  done
done
