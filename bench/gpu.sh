#!/usr/bin/env bash
# The GPU check: one prepared run, no network. Each part has its own time limit, so one slow part cannot hide
# the others' results. With no argument it runs the prepared check (about 8 minutes at worst, caps summed),
# which fits one short lease of a GPU machine with time left to rerun a part:
#   tests            the CUDA-only tests in tests/ (bf16 frozen base + fp32 adapters, torch.compile vs eager,
#                    NCCL through torchrun with 1 process: DDP and FSDP2, with resume)
#   step             bench/step.py   whole training steps, LLaMA-2-7B shape (32 layers, random weights, batch 1
#                    x 1024 tokens), eager: MoR E8R8 vs LoRA R8 vs MoELoRA E8R8: tokens/s, peak memory, MFU
#   step-compiled    the same methods compiled per block as train.py does (--compile_mode default; 8 layers of
#                    7B shape, to bound compile time; identical blocks share one compilation)
#   step-graphs      the same with --compile_mode reduce-overhead: each compiled block replayed as a CUDA graph
#   decode           bench/infer.py  decoding with the KV cache, eager and replayed as a CUDA graph
#   profile          bench/profile_layer.py  where one layer's time goes (torch.profiler): kernel vs wall time
# Parts run only when named (or with `all`):
#   layer            bench/layer.py  one adapted 7B FFN linear vs the frozen base (bf16, batch 1 and 4 x 1024 tokens)
#   load             bench/load.py   peak host memory of from_checkpoint on a 4 GB two-shard checkpoint
#   decode-compiled  bench/infer.py --compile reduce-overhead: the decoding step compiled and graph-replayed
#
#     bash bench/gpu.sh                       # the prepared check; output on stdout, and in $OUT/gpu.log when OUT is set
#     bash bench/gpu.sh all                   # every part (about 11 minutes at worst)
#     bash bench/gpu.sh layer decode-compiled # only these
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

PREPARED="tests step step-compiled step-graphs decode profile"
KNOWN="$PREPARED layer load decode-compiled"
PARTS=("$@")
[ ${#PARTS[@]} -eq 0 ] && read -ra PARTS <<< "$PREPARED"
[ "${PARTS[*]}" = "all" ] && read -ra PARTS <<< "$KNOWN"
want() {  # want NAME: true when NAME is among the parts to run
    local p; for p in "${PARTS[@]}"; do [ "$p" = "$1" ] && return 0; done; return 1
}
for p in "${PARTS[@]}"; do
    case " $KNOWN " in *" $p "*) ;; *) echo "bench/gpu.sh: unknown part '$p' (known: $KNOWN)" >&2; exit 2;; esac
done

run() {
    echo "== device"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    python -c "import torch; print('torch', torch.__version__, '| CUDA', torch.version.cuda, '|', torch.cuda.get_device_name(0))"
    local methods="MoR E8R8,LoRA R8,MoELoRA E8R8"
    want tests && part 120 "CUDA tests" python -m pytest -q -rs -k cuda tests
    want step && part 60 "training step, eager" python bench/step.py --methods "$methods"
    want step-compiled && part 90 "training step, compiled" python bench/step.py --compile --n_layers 8 \
        --methods "$methods"
    want step-graphs && part 100 "training step, compiled + CUDA graphs" python bench/step.py \
        --compile_mode reduce-overhead --n_layers 8 --methods "$methods"
    want decode && part 60 "decoding" python bench/infer.py --cuda_graph --models "frozen base,merged LoRA R8,MoR E8R8" \
        --warmup 1 --repeats 3
    want profile && part 40 "where the time goes" python bench/profile_layer.py --rows 8
    want layer && part 40 "one adapted linear" python bench/layer.py
    want load && part 45 "loading" python bench/load.py --size_gb 4 --n_shards 2 --device cpu
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
