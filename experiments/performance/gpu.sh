#!/usr/bin/env bash
# Every GPU measurement of the performance work in one command, for a machine with NVIDIA GPUs
# (written for one H100 or H200; about 15 minutes there):
#
#     bash experiments/performance/gpu.sh [OUT]          # default OUT=workdirs/gpu
#
# 1. `vdm.bench` on the paper's CIFAR-10 configuration (32 blocks x 128 channels) at batch 128:
#    bfloat16 (the 40%-MFU target), float32, and bfloat16 with rematerialised blocks at batch 256;
#    and on the demo's config (configs/mnist.py) as it ships.
# 2. `ab.py`: the custom-gradient convolution against XLA's own gradient (`model.convolution_gradient`), on
#    the paper network in bfloat16 and on the demo network; scanned against unrolled blocks at
#    4 blocks (the depth up to which `scan_blocks="auto"` unrolls).
# 3. `scaling.py`: images/s on 1, 2, 4, 8 GPUs at a fixed global batch (counts above the number
#    of GPUs present are skipped).
#
# Images are random (`fake_data.py`: CIFAR-10 cannot be downloaded here; the step's time does not
# depend on pixel values). Every command's output is kept in OUT/*.txt, the benchmarks' figures in
# OUT/*.json, and OUT/summary.md collects the benchmark rows in the README's table format.
# SMALL=1 shrinks every model and count so that the whole script runs on a 2-core CPU in about 10 minutes:
# for checking the script, not for figures. QUICK=1 keeps the models and cuts the counts (10 timed calls,
# 3 A/B rounds, 128 sampler steps on the paper network) and runs the most wanted figures first, for a GPU
# lent for minutes: the paper network in bf16, its convolution A/B, the demo, float32, remat, the demo's A/B.
# A command that fails is recorded in OUT/failed.txt and the rest go on; the summary is written from
# whatever benchmark JSON exists (`python experiments/performance/gpu_summary.py OUT` rewrites it).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-workdirs/gpu}
PY=${PY:-python}
mkdir -p "$OUT"
DATA="$OUT/fake_cifar"
$PY experiments/performance/fake_data.py "$DATA" --train 2048 --test 512 || exit 1

BATCH=128 BIG=256 CALLS=20 ROUNDS=6 PER=5
SHRINK=()
if [[ "${QUICK:-0}" == 1 ]]; then
    CALLS=10 ROUNDS=3 PER=3
    SHRINK=(sample.steps=128)
fi
if [[ "${SMALL:-0}" == 1 ]]; then
    BATCH=8 BIG=16 CALLS=2 ROUNDS=2 PER=1
    SHRINK=(model.network_kwargs.num_blocks=1 model.network_kwargs.channels=16 sample.steps=4
            sample.num_images=4)
fi
# The same overrides for vdm.bench (--config.F=V) and for the scripts (--override F=V).
paper=(data.source=npz "data.kwargs.path=$DATA" "${SHRINK[@]}")
as_flags() { for o in "$@"; do printf -- '--config.%s\n' "$o"; done; }
as_overrides() { for o in "$@"; do printf -- '--override\n%s\n' "$o"; done; }
run() {  # run NAME COMMAND...: the command's output on the terminal and in OUT/NAME.txt
    local name=$1; shift
    echo "== $name: $*"
    local start=$SECONDS
    "$@" 2>&1 | tee "$OUT/$name.txt"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - start)) s"
    [[ $rc == 0 ]] || echo "$name (exit $rc)" >> "$OUT/failed.txt"
}
bench() {  # bench NAME CONFIG OVERRIDES...
    local name=$1 config=$2; shift 2
    mapfile -t f < <(as_flags "$@")
    run "$name" $PY -m vdm.bench --config "$config" "${f[@]}" --calls "$CALLS" --samplers ancestral,ddim \
        --json "$OUT/$name.json"
}

demo=()
[[ "${SMALL:-0}" == 1 ]] && demo=(train.batch_size=8 sample.num_images=4 sample.steps=4)
mapfile -t p < <(as_overrides "${paper[@]}" model.dtype=bfloat16 train.batch_size=$BATCH)
mapfile -t d < <(as_overrides "${demo[@]}")
mapfile -t p4 < <(as_overrides "${paper[@]}" model.dtype=bfloat16 train.batch_size=$BATCH model.network_kwargs.num_blocks=4)

# In order of what is most wanted, so that a run cut short keeps the figures that matter.
bench bench_paper_bf16 configs/cifar10.py "${paper[@]}" model.dtype=bfloat16 train.batch_size=$BATCH
run ab_conv_paper_bf16 $PY experiments/performance/ab.py --config configs/cifar10.py "${p[@]}" \
    --rounds "$ROUNDS" --calls "$PER"
bench bench_demo configs/mnist.py "${demo[@]}"
bench bench_paper_fp32 configs/cifar10.py "${paper[@]}" model.dtype=float32 train.batch_size=$BATCH
bench bench_paper_bf16_remat configs/cifar10.py "${paper[@]}" model.dtype=bfloat16 model.remat=true \
    train.batch_size=$BIG
run ab_conv_demo $PY experiments/performance/ab.py --config configs/mnist.py "${d[@]}" --rounds "$ROUNDS" --calls "$PER"
run ab_scan_paper4_bf16 $PY experiments/performance/ab.py --config configs/cifar10.py "${p4[@]}" \
    --variant scan=model.network_kwargs.scan_blocks=true --variant unrolled=model.network_kwargs.scan_blocks=false \
    --rounds "$ROUNDS" --calls "$PER"
run scaling_paper_bf16 $PY experiments/performance/scaling.py --config configs/cifar10.py "${p[@]}" \
    --devices 1 2 4 8 --rounds 2

$PY experiments/performance/gpu_summary.py "$OUT"
echo "figures: $OUT (summary.md, bench_*.json, and each command's output in *.txt)"
