#!/usr/bin/env bash
# On a machine with one NVIDIA GPU: compiles each paper preset's train and eval steps for it
# (`--compile_for=h200-1`, or GPU=h100-1), runs the train step on random data and prints the
# roofline estimate next to the measured time. Usage: bash benchmarks/gpu_steps.sh [OUTDIR]
# Needs jax with CUDA, flax, optax, orbax-checkpoint, ml_collections (no TensorFlow).
set -u
out=${1:-gpu_steps}
mkdir -p "$out"
gpu=${GPU:-h200-1}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" \
    | tee -a "$out/gpu.txt"
# preset, global batch (per GPU here: 128 for CIFAR-10 as the paper; 32 for ImageNet, the
# paper's 256 split over 8 GPUs), time limit in seconds
while read -r dataset preset batch limit; do
    name="${dataset}_${preset//\//_}"
    echo "== $dataset:$preset batch $batch" | tee "$out/$name.txt"
    timeout "$limit" python3 "experiments/$dataset.py" \
        --config="pcjax/configs/$dataset.py:$preset" --compile_for="$gpu" \
        --config.data.global_batch_size="$batch" >>"$out/$name.txt" 2>"$out/$name.log"
    echo "exit $?" >>"$out/$name.txt"
    cat "$out/$name.txt"
done <<'LIST'
cifar10 mod/rho_psi 128 180
cifar10 mod/linear_plus_rho 128 180
imagenet resnet18/relu 32 90
imagenet mod/rho_psi 32 120
imagenet mod/linear_plus_rho 32 120
LIST
