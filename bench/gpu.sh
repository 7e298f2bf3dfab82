#!/usr/bin/env bash
# The GPU check: one prepared run, no network. Each part has its own time limit, so one slow part cannot hide
# the others' results, and every script prints each figure as soon as it exists (line-buffered), so a part
# stopped by its limit keeps what it measured. With no argument it runs the prepared check: the caps below
# sum to 420 s; with the device line first (capped at 20 s) and about 40 s to start a GPU machine, the whole
# run takes 8 minutes at worst.
#
#   part             cap  what                                             basis of the cap
#   tests            100  the CUDA-only tests in tests/ (bf16 frozen base  not timed on a GPU yet: 4 tests, two of
#                         + fp32 adapters, compiled vs eager, reduce-       them compile tiny blocks (~15 s each),
#                         overhead with gradient accumulation, NCCL via    one starts torchrun 4 times (~10 s each)
#                         torchrun with 1 process: DDP and FSDP2, resume)
#   step              35  bench/step.py whole training steps, LLaMA-2-7B   last H100 run: steps of 150-250 ms, so
#                         shape (32 layers, random weights, batch 1 x      3 warm-up + 10 paired rounds of 3 methods
#                         1024 tokens), eager: MoR E8R8, LoRA R8, MoELoRA  take ~15 s, plus ~10 s to start and build
#                         E8R8: tokens/s, peak memory, MFU
#   step-compiled     80  the same, compiled per block as train.py does    last H100 run: 80-100 s for 6 graphs of
#                         (mode default), MoR E8R8 and LoRA R8 at 4        3 methods (~15 s a graph); 2 methods are
#                         layers (identical blocks share one compilation)  4 graphs, ~60 s, plus the timed rounds
#   step-graphs       80  the same with --compile_mode reduce-overhead:    as step-compiled
#                         each compiled block replayed as a CUDA graph
#   decode            40  bench/infer.py decoding with the KV cache, eager last H100 run: 31-52 ms a token eager,
#                         and replayed as a CUDA graph, 7B shape           4 rounds x 32 tokens x 3 models ~ 20 s
#   decode-compiled   45  bench/infer.py --compile reduce-overhead at 2    not timed on a GPU yet: one forward-only
#                         layers: merged LoRA R8 and MoR E8R8              graph per model, less than a step's ~15 s
#   profile           15  bench/profile_layer.py: where one 7B FFN         a few hundred fwd+bwd of one layer: ~5 s
#                         linear's time goes (torch.profiler)              after start-up
#   profile-compiled  25  bench/profile_layer.py --compiled at 7B FFN      not timed on a GPU yet: 4 compilations
#                         shape: graphs, graph breaks, fused kernels of    of a block of two linears, smaller than
#                         one compiled block, LoRA R8 and MoR E8R8         a transformer block's ~15 s
# Parts run only when named (or with `all`):
#   layer             40  bench/layer.py one adapted 7B FFN linear vs the frozen base (bf16, batch 1 and 4 x 1024)
#   load              45  bench/load.py peak host memory of from_checkpoint on a 4 GB two-shard checkpoint
# A part that outlives its cap gets SIGTERM (exit 124), and SIGKILL 10 s later if it is still there
# (`timeout -k 10`: torchrun's children too, as timeout signals its whole process group).
#
#     bash bench/gpu.sh                       # the prepared check; stdout, and appended to $OUT/gpu.log when OUT is set
#     bash bench/gpu.sh all                   # every part (about 9.5 minutes at worst)
#     bash bench/gpu.sh layer decode-compiled # only these
#     bash bench/gpu.sh --dry-run [PARTS]     # every part (or PARTS) at tiny shapes on the CPU, in about a minute:
#                                             # checks the commands, not the GPU (tests: the CUDA ones are skipped)
#     PYTHON=/path/to/python bash bench/gpu.sh   # another interpreter (default: python)
# Exit status: 0 when every part exited 0, else 1 (the failed parts are listed at the end).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python}

DRY=0
[ "${1:-}" = "--dry-run" ] && { DRY=1; shift; }
PREPARED="tests step step-compiled step-graphs decode decode-compiled profile profile-compiled"
KNOWN="$PREPARED layer load"
PARTS=("$@")
if [ ${#PARTS[@]} -eq 0 ]; then
    if [ $DRY = 1 ]; then read -ra PARTS <<< "$KNOWN"; else read -ra PARTS <<< "$PREPARED"; fi
fi
[ "${PARTS[*]}" = "all" ] && read -ra PARTS <<< "$KNOWN"
for p in "${PARTS[@]}"; do
    case " $KNOWN " in *" $p "*) ;; *) echo "error: bench/gpu.sh: unknown part '$p' (known: $KNOWN)" >&2; exit 2;; esac
done

# per-script arguments: the GPU run's, or (--dry-run) tiny CPU shapes that override them (argparse: last wins)
if [ $DRY = 1 ]; then
    STEP=(--device cpu --preset tiny --n_layers 2 --seq_len 16 --warmup 1 --repeats 1)
    COMPILE=(--backend aot_eager)   # Dynamo's capture without code generation: seconds, not minutes, on a CPU
    DECODE=(--device cpu --preset tiny --prompt_len 8 --new_tokens 2 --warmup 0 --repeats 1)
    GRAPH=()                        # CUDA graphs need CUDA
    PROFILE=(--device cpu --tokens 8 --d_in 64 --d_out 192 --rows 3)
    PCOMPILED=(--device cpu --backend eager --steps 1 --tokens 8 --d_in 16 --d_out 32)
    LAYER=(--device cpu --shapes 64x192,192x64 --seq_len 16 --warmup 0 --repeats 1)
    LOAD=(--size_gb 0.05)
else
    STEP=() COMPILE=() DECODE=() GRAPH=(--cuda_graph) PROFILE=() LAYER=() LOAD=()
    PCOMPILED=(--tokens 1024 --d_in 4096 --d_out 11008)
fi

FAILED=()
part() {  # part NAME SECONDS TITLE COMMAND...: runs COMMAND under its cap when NAME is among the parts
    local name=$1 limit=$2 title=$3; shift 3
    [ $DRY = 1 ] && limit=$((limit * 4))  # the caps are the GPU run's; a busy CPU may take a few times longer
    local p wanted=0
    for p in "${PARTS[@]}"; do [ "$p" = "$name" ] && wanted=1; done
    [ $wanted = 1 ] || return 0
    echo; echo "== $name: $title  (cap $limit s; \$ $*)"
    local t0=$SECONDS rc
    timeout -k 10 "$limit" "$@"
    rc=$?
    echo "-- $name: exit $rc$([ $rc = 124 ] && echo ' (time limit)'), $((SECONDS - t0)) s"
    [ $rc = 0 ] || FAILED+=("$name")
}

run() {
    echo "== bench/gpu.sh $([ $DRY = 1 ] && echo '--dry-run ')${PARTS[*]}: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    timeout -k 10 20 "$PY" -c "import torch; print('torch', torch.__version__, '| CUDA', torch.version.cuda, '|',
          torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device')"
    local methods="MoR E8R8,LoRA R8,MoELoRA E8R8"
    part tests 100 "CUDA tests" "$PY" -m pytest -v -rs -k cuda tests
    part step 35 "training step, eager" "$PY" bench/step.py --methods "$methods" "${STEP[@]}"
    part step-compiled 80 "training step, compiled" "$PY" bench/step.py --compile --n_layers 4 \
        --methods "MoR E8R8,LoRA R8" "${COMPILE[@]}" "${STEP[@]}"
    part step-graphs 80 "training step, compiled + CUDA graphs" "$PY" bench/step.py --compile_mode reduce-overhead \
        --n_layers 4 --methods "MoR E8R8,LoRA R8" "${COMPILE[@]}" "${STEP[@]}"
    part decode 40 "decoding" "$PY" bench/infer.py "${GRAPH[@]}" --models "frozen base,merged LoRA R8,MoR E8R8" \
        --warmup 1 --repeats 3 "${DECODE[@]}"
    part decode-compiled 45 "decoding, compiled + CUDA graphs, 2 layers" "$PY" bench/infer.py --compile \
        reduce-overhead --n_layers 2 --models "merged LoRA R8,MoR E8R8" --warmup 1 --repeats 3 "${COMPILE[@]}" \
        "${DECODE[@]}"
    part profile 15 "where the time goes" "$PY" bench/profile_layer.py --rows 8 "${PROFILE[@]}"
    part profile-compiled 25 "one compiled block" "$PY" bench/profile_layer.py --compiled "${PCOMPILED[@]}"
    part layer 40 "one adapted linear" "$PY" bench/layer.py "${LAYER[@]}"
    part load 45 "loading" "$PY" bench/load.py --size_gb 4 --n_shards 2 --device cpu "${LOAD[@]}"
    echo
    if [ ${#FAILED[@]} -gt 0 ]; then echo "== failed: ${FAILED[*]}"; return 1; fi
    echo "== every part exited 0, $SECONDS s"
}

if [ -n "${OUT:-}" ]; then   # appended as it is printed: a rerun of a part keeps the earlier run's log
    mkdir -p "$OUT"
    run 2>&1 | tee -a "$OUT/gpu.log"
else
    run 2>&1
fi
