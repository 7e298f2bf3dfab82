#!/usr/bin/env bash
# The GPU check: one prepared run, no network. Each part has its own time limit, so one slow part cannot hide
# the others' results. Parts (in this order; name some to run only those):
#   tests            the CUDA-only tests: bf16 frozen base + fp32 adapters, torch.compile vs eager, NCCL through
#                    torchrun with 1 process (DDP and FSDP2, with resume)
#   layer            bench/layer.py  one adapted 7B FFN linear vs the frozen base (bf16, batch 1 and 4 x 1024 tokens)
#   step             bench/step.py   whole training steps, LLaMA-2-7B shape (32 layers, random weights), eager:
#                    MoR E8R8 vs LoRA R8 vs MoELoRA E8R8 vs DoRA R8: tokens/s, peak memory, MFU
#   decode           bench/infer.py  decoding with the KV cache, eager and CUDA graphs
#   load             bench/load.py   peak host memory of from_checkpoint on a 4 GB two-shard checkpoint
#   profile          bench/profile_layer.py  where one layer's time goes (torch.profiler): kernel vs wall time
#   step-compiled    bench/step.py --compile: MoR vs LoRA compiled per block as train.py runs on CUDA (8 layers,
#                    to bound compile time; identical blocks share one compilation)
#   step-graphs      the same with --compile_mode reduce-overhead: each compiled block replayed as a CUDA graph
#   decode-compiled  bench/infer.py --compile reduce-overhead: the decoding step compiled and graph-replayed
# The first seven took about 5 minutes on one H100 (8 at worst); the last two are new and capped at 2 minutes
# each (12 minutes in all at worst), so on a machine lent for 10-minute commands run them in two calls.
#
#     bash bench/gpu.sh                            # every part; output on stdout, and in $OUT/gpu.log when OUT is set
#     bash bench/gpu.sh step-graphs decode-compiled   # only these
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

PARTS=("$@")
want() {  # want NAME: true when no part was named, or NAME was
    [ ${#PARTS[@]} -eq 0 ] && return 0
    local p; for p in "${PARTS[@]}"; do [ "$p" = "$1" ] && return 0; done; return 1
}
KNOWN="tests layer step decode load profile step-compiled step-graphs decode-compiled"
for p in "${PARTS[@]}"; do
    case " $KNOWN " in *" $p "*) ;; *) echo "bench/gpu.sh: unknown part '$p' (known: $KNOWN)" >&2; exit 2;; esac
done

run() {
    echo "== device"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    python -c "import torch; print('torch', torch.__version__, '| CUDA', torch.version.cuda, '|', torch.cuda.get_device_name(0))"
    want tests && part 150 "CUDA tests" python -m pytest -q -rs -k cuda tests/test_train.py
    want layer && part 40 "one adapted linear" python bench/layer.py
    want step && part 60 "training step, eager" python bench/step.py
    want decode && part 60 "decoding" python bench/infer.py --cuda_graph --models "frozen base,merged LoRA R8,MoR E8R8" \
        --warmup 1 --repeats 3
    want load && part 45 "loading" python bench/load.py --size_gb 4 --n_shards 2 --device cpu
    want profile && part 40 "where the time goes" python bench/profile_layer.py --rows 8
    want step-compiled && part 80 "training step, compiled" python bench/step.py --compile --n_layers 8 \
        --methods "MoR E8R8,LoRA R8"
    want step-graphs && part 120 "training step, compiled + CUDA graphs" python bench/step.py \
        --compile_mode reduce-overhead --n_layers 8 --methods "MoR E8R8,LoRA R8"
    want decode-compiled && part 120 "decoding, compiled + CUDA graphs" python bench/infer.py \
        --compile reduce-overhead --models "frozen base,merged LoRA R8,MoR E8R8" --warmup 2 --repeats 3
    true
}

if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    run 2>&1 | tee "$OUT/gpu.log"
else
    run 2>&1
fi
