#!/usr/bin/env bash
# The GPU check: one prepared run, about 5 minutes on one H100 (8 minutes at worst: each part is capped), no network.
#   1. the CUDA-only tests: bf16 frozen base + fp32 adapters, torch.compile vs eager, NCCL through
#      torchrun with 1 process (DDP and FSDP2, with resume);
#   2. bench/layer.py  one adapted 7B FFN linear vs the frozen base (bf16, batch 1 and 4 x 1024 tokens);
#   3. bench/step.py   whole training steps, LLaMA-2-7B shape (32 layers, random weights), eager:
#                      MoR E8R8 vs LoRA R8 vs MoELoRA E8R8 vs DoRA R8: tokens/s, peak memory, MFU;
#   4. bench/infer.py  decoding with the KV cache, eager and CUDA graphs;
#   5. bench/load.py   peak host memory of from_checkpoint on a 4 GB two-shard checkpoint;
#   6. bench/profile_layer.py  where one layer's time goes (torch.profiler): kernel time vs wall time;
#   7. bench/step.py --compile  MoR vs LoRA compiled per block, as train.py runs on CUDA (8 layers, to
#                      bound compile time; identical blocks share one compilation).
# Each part has its own time limit, so one slow part cannot hide the others' results.
#
#     bash bench/gpu.sh            # output on stdout, and in $OUT/gpu.log when OUT is set
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

part() {  # part SECONDS TITLE COMMAND...
    local limit=$1 title=$2; shift 2
    echo; echo "== $title  (\$ $*)"
    local t0=$SECONDS
    timeout "$limit" "$@"
    echo "-- exit $?, $((SECONDS - t0)) s"
}

run() {
    echo "== device"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    python -c "import torch; print('torch', torch.__version__, '| CUDA', torch.version.cuda, '|', torch.cuda.get_device_name(0))"
    part 150 "CUDA tests" python -m pytest -q -rs -k cuda tests/test_train.py
    part 40 "one adapted linear" python bench/layer.py
    part 60 "training step, eager" python bench/step.py
    part 60 "decoding" python bench/infer.py --cuda_graph --models "frozen base,merged LoRA R8,MoR E8R8" \
        --warmup 1 --repeats 3
    part 45 "loading" python bench/load.py --size_gb 4 --n_shards 2 --device cpu
    part 40 "where the time goes" python bench/profile_layer.py --rows 8
    part 80 "training step, compiled" python bench/step.py --compile --n_layers 8 --methods "MoR E8R8,LoRA R8"
}

if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    run 2>&1 | tee "$OUT/gpu.log"
else
    run 2>&1
fi
