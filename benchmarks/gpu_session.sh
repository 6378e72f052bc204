#!/usr/bin/env bash
# One borrowed GPU, one call: the GPU benchmark and the generalization study's recipes.
#
#   bash benchmarks/gpu_session.sh prepare   # here: wheels, shards and grey sources into .gpu/
#   bash benchmarks/gpu_session.sh run       # there, in one device call that carries .gpu
#
# The device machine has its own Python with torch and pytorch-lightning but no webdataset
# and no way to download, so `prepare` puts the pure-Python wheels the pipeline needs there
# beside the prepared shards (.gpu/ is ignored by git; ~20 MB). `run` installs them, runs
# `bihm bench --device cuda` (the GPU table of docs/performance.md: eager against compiled,
# with and without CUDA graphs), then trains every recipe
# of configs/sweep_generalization.yaml side by side on the one GPU for GPU_TRAIN_S seconds
# each (train.max_time_s: each stops on a finished, validated, checkpointed epoch) and packs
# each run folder into $OUT, to be continued here with `bihm train --resume --run-dir`.
# GPU_SESSION_DEVICE=cpu, GPU_SESSION_BENCH=0 and GPU_SESSION_EXTRA="--set ..." (a tiny model
# and data subset) run the same steps on a CPU: the script's own check.
set -euo pipefail
cd "$(dirname "$0")/.."
GPU=.gpu
OUT="${OUT:-$GPU/out}"
DEVICE="${GPU_SESSION_DEVICE:-cuda}"
TRAIN_S="${GPU_TRAIN_S:-240}"
BENCH_S="${GPU_BENCH_S:-270}"  # one device call runs at most 600 s: bench, then training

prepare() {
    local source="${BIHM_DATA_SOURCE:?set BIHM_DATA_SOURCE to the binarized MNIST mirror}"
    mkdir -p "$GPU/wheels" "$GPU/data"
    python3 -m pip download --quiet --no-deps -d "$GPU/wheels" webdataset==1.0.2 braceexpand
    bihm data prepare --source "$source" --out "$GPU/data/binarized_mnist" --no-progress
    bihm data prepare --source "$source" --dataset binarized_mnist_grey \
        --out "$GPU/data/grey" --no-progress
    # The grey intensities compress 4x; the device call carries at most 64 MiB.
    tar -czf "$GPU/grey.tar.gz" -C "$GPU/data" grey && rm -rf "$GPU/data/grey"
    du -sh "$GPU"
}

run() {
    mkdir -p "$OUT"
    local py="${PYTHON:-python3}"
    "$py" -m pip install --quiet --no-index --no-deps --find-links "$GPU/wheels" \
        webdataset braceexpand 2>/dev/null || echo "gpu_session: using the installed webdataset"
    tar -xzf "$GPU/grey.tar.gz" -C "$GPU/data"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    local shards="$GPU/data/binarized_mnist"
    if [ "${GPU_SESSION_BENCH:-1}" = 1 ]; then
        # Eager and compiled (train.compile: true, with and without CUDA graphs) side by
        # side; bounded, so that a slow compilation cannot cost the training below.
        timeout "$BENCH_S" "$py" -m pipeline.cli bench --device "$DEVICE" --shards "$shards" \
            --no-contention --json "$OUT/bench_$DEVICE.json" > "$OUT/bench.log" 2>&1 \
            || echo "gpu_session: bench failed or ran past ${BENCH_S} s, see bench.log"
    fi
    # One process per recipe, all on the one GPU (each is launch-bound, not arithmetic-bound).
    local recipes
    recipes=$("$py" - <<'EOF'
import json
from pipeline.tune import load_sweep

sweep = load_sweep("configs/sweep_generalization.yaml")
(param,) = [p for p in sweep.params if p.key == "set"]
for i, bundle in enumerate(param.values):
    print(i, " ".join(f"--set {k}={json.dumps(v)}" for k, v in bundle.items()) or "-")
EOF
)
    local pids=()
    while read -r i sets; do
        [ "$sets" = "-" ] && sets=""
        # shellcheck disable=SC2086
        "$py" -m pipeline.cli train --config configs/bmnist_paper.yaml $sets \
            --run-dir "$GPU/runs/recipe$i" \
            --set data.shard_dir="$shards" --set data.grey_shard_dir="$GPU/data/grey" \
            --set train.accelerator="${DEVICE/cuda/gpu}" --set train.max_time_s="$TRAIN_S" \
            --set validation.gibbs.every_n_epochs=0 --set samples.every_n_epochs=0 \
            --set logging.wandb=off --set logging.progress_bar=false \
            ${GPU_SESSION_EXTRA:-} > "$GPU/runs/recipe$i.log" 2>&1 &
        pids+=($!)
    done < <(mkdir -p "$GPU/runs" && echo "$recipes")
    local failed=0
    for pid in "${pids[@]}"; do wait "$pid" || failed=$((failed + 1)); done
    for dir in "$GPU"/runs/recipe*/; do
        local name
        name=$(basename "$dir")
        tar -czf "$OUT/$name.tar.gz" -C "$GPU/runs" "$name.log" \
            "$name/config.yaml" "$name/metrics.csv" "$name/curves.png" "$name/checkpoints/last.ckpt"
    done
    echo "gpu_session: ${#pids[@]} recipes trained, $failed failed; outputs in $OUT"
    ls -la "$OUT"
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: bash benchmarks/gpu_session.sh prepare|run" >&2; exit 2 ;;
esac
