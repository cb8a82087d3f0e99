#!/bin/bash
# One device call of at most ~520 s (give the call timeout_s 540): the GPU checks of this project in
# order of value, each phase in its own time box, everything it learns in at most 8 files under $OUT.
#
#   a  correctness      pytest -m gpu; host-device syncs per epoch of ResNet-preact-20 (count_syncs.py)
#   b  step speed       ResNet-preact-20/56, WRN-16-8, batch 128, bf16 + channels_last: eager, --compile,
#                       --compile --compile_mode reduce-overhead: images/s, steps/s, compile time
#   c  published row    ResNet-preact-20, 200 epochs, cosine, lr 0.2 (7.60% published, median of 3):
#                       seeds 0 1 2 at once on the GPU, on the path b found fastest, stopped by SIGTERM at
#                       the box's end (main.py checkpoints and exits 143); resumed with --resume next time
#   d  time to accuracy benchmarks/time_to_accuracy.py --recipe fast_airbench94_muon (compiled), N runs
#                       sized to the time left; airbench94_muon.py beside it only when that time allows
#
# Before the call, here: benchmarks/gpu/prepare.sh (it prints the carry list and the command).
# On the device:  bash benchmarks/gpu/session.sh   (timeout_s 540; carry: .data and .gpu/{commit.txt,row,
#                 step_speed.json,airbench}, those that exist: prepare.sh prints the list)
# Rerun phases:   PHASES="a b" bash benchmarks/gpu/session.sh
# CPU dry run:    GPU_DRY=1 benchmarks/gpu/session.sh         (tiny data, a few steps, --device cpu;
#                 compiling is skipped: on a CPU it needs minutes and a C++ compiler; see the README)
#
# $OUT: env.txt session.log correctness.json step_speed.json row.json tta.json row.tgz logs.tgz
# Settings (environment): PHASES OUT WORK ROW TOTAL A_CAP B_CAP C_MAX D_MIN SEEDS PYTHON
set -u
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
SCRIPT=$(readlink -f "$0"); HERE=$(dirname "$SCRIPT"); ROOT=$(cd "$HERE/../.." && pwd)
cd "$ROOT" || exit 2
PY=${PYTHON:-$(command -v python3 || command -v python)}
REPORT="$PY $HERE/session_report.py"
export DRY=${DRY:-$([ "${GPU_DRY:-0}" = 1 ] && echo 1 || echo 0)}
export PHASES=${PHASES:-a b c d}
if [ "$DRY" = 1 ]; then
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} SEEDS=${SEEDS:-0 1}  # two seeds are enough to try the launch
    export WORK=${WORK:-$(mktemp -d /tmp/gpu-dry.XXXXXX)}
    export OUT=${OUT:-$WORK/OUT} ROW=${ROW:-$WORK/row}
    export TOTAL=${TOTAL:-170} A_CAP=${A_CAP:-45} B_CAP=${B_CAP:-30} C_MAX=${C_MAX:-60} D_MIN=${D_MIN:-10}
    export ROW_EPOCHS=${ROW_EPOCHS:-2} ROW_EVAL=${ROW_EVAL:-1} ROW_SAVE=${ROW_SAVE:-1}
    DEV=(--device cpu)
else
    export SEEDS=${SEEDS:-0 1 2}
    [ -n "${OUT:-}" ] || { echo "session.sh: OUT is not set (the device tool sets it; GPU_DRY=1 for a CPU dry run)"; exit 2; }
    export WORK=${WORK:-/tmp/gpu-session} ROW=${ROW:-$ROOT/.gpu/row}
    export TOTAL=${TOTAL:-515} A_CAP=${A_CAP:-90} B_CAP=${B_CAP:-150} C_MAX=${C_MAX:-330} D_MIN=${D_MIN:-90}
    export ROW_EPOCHS=${ROW_EPOCHS:-200} ROW_EVAL=${ROW_EVAL:-10} ROW_SAVE=${ROW_SAVE:-10}
    DEV=()
fi
LOGS=$WORK/logs; DATA=$WORK/data; SUB=$WORK/data10k
[ "$DRY" = 1 ] && SUB=$DATA
ROW_FLAGS=(--arch resnet_preact --depth 20 --epochs "$ROW_EPOCHS" --scheduler cosine --base_lr 0.2 --precision bf16
           --channels_last --test_batch_size 500 --eval_every "$ROW_EVAL" --save_every "$ROW_SAVE" --no-tensorboard
           --dataset_dir "$DATA" "${DEV[@]}")
SPEED_ARCHS=("resnet_preact20|--arch resnet_preact --depth 20" "resnet_preact56|--arch resnet_preact --depth 56"
             "wrn16_8|--arch wrn --depth 16 --widening_factor 8")
SPEED_MODES=("eager|" "compile|--compile" "reduce-overhead|--compile --compile_mode reduce-overhead")
if [ "$DRY" = 1 ]; then
    SPEED_BATCH=32; SPEED_FLAGS=(--epochs 2 --eval_every 2 --save_every 2)
else
    SPEED_BATCH=128; SPEED_FLAGS=(--epochs 4 --eval_every 4 --save_every 4)
fi
SPEED_FLAGS=(--dataset_dir "$SUB" --batch_size $SPEED_BATCH --precision bf16 --channels_last --scheduler cosine
             --no-tensorboard "${SPEED_FLAGS[@]}" "${DEV[@]}")

now() { date +%s; }
el() { echo "[$(( $(now) - START ))s] $*"; }
left() { echo $(( ${PHASE_DEADLINE:-$END} - $(now) )); }
selected() { [[ " $PHASES " == *" $1 "* ]]; }
# bounded SECONDS CMD...: CMD under `timeout`, cut to the phase's deadline (TERM, KILL 5 s later)
bounded() {
    local cap=$1 l; shift
    l=$(( $(left) - 3 )); [ "$l" -lt "$cap" ] && cap=$l
    [ "$cap" -ge 1 ] || { echo "no time left for: $*"; return 124; }
    timeout -k 5 "$cap" "$@"
}
commit() {
    if [ "$DRY" = 1 ] && git rev-parse HEAD >/dev/null 2>&1; then
        echo "$(git rev-parse HEAD)$(git diff --quiet HEAD 2>/dev/null || echo ' +uncommitted changes') (git, dry run)"
    elif [ -f .gpu/commit.txt ]; then
        cat .gpu/commit.txt
    else
        echo "$(git rev-parse HEAD 2>/dev/null || echo unknown) (no .gpu/commit.txt: benchmarks/gpu/prepare.sh was not run)"
    fi
}
pack_logs() { tar czf "$WORK/logs.tgz.tmp" -C "$WORK" logs 2>/dev/null && mv -f "$WORK/logs.tgz.tmp" "$OUT/logs.tgz"; }
pack_row() {
    [ -d "$ROW" ] || return 0
    tar czf "$WORK/row.tgz.tmp" --exclude='.tmp-*' --transform "s,^$(basename "$ROW"),row," \
        -C "$(dirname "$ROW")" "$(basename "$ROW")" 2>/dev/null && mv -f "$WORK/row.tgz.tmp" "$OUT/row.tgz"
}

# ---- setup ---------------------------------------------------------------------------------------
write_env() {
    {
        echo "session: benchmarks/gpu/session.sh$([ "$DRY" = 1 ] && echo ' GPU_DRY=1 (CPU dry run: tiny data, no compile)')"
        echo "started: $(date -u +%FT%TZ)   phases: $PHASES   budget: ${TOTAL}s"
        echo "commit under test: $(commit)"
        git rev-parse HEAD >/dev/null 2>&1 && echo "git here: $(git rev-parse HEAD)" || echo "git here: not available"
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit,temperature.gpu \
            --format=csv 2>/dev/null || echo "nvidia-smi: not available"
        $PY - <<'EOF'
import os, platform
from importlib import metadata
if os.environ['DRY'] == '1':  # no CUDA to ask about: the versions alone, without importing torch (2 s)
    torch = None
    print('python', platform.python_version(), '| torch', metadata.version('torch'))
else:
    import torch
    print('python', platform.python_version(), '| torch', torch.__version__, '| cuda', torch.version.cuda,
          '| cudnn', torch.backends.cudnn.version())


def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return 'not installed'


print(' | '.join(f'{name} {version(name)}' for name in ('torchvision', 'triton', 'numpy', 'pytest')))
if torch is not None and torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print('device', p.name, f'| sm_{p.major}{p.minor} | {p.multi_processor_count} SMs | {p.total_memory / 2**30:.1f} GiB')
else:
    print('device: no CUDA')
EOF
        echo "cpus: $(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)   memory: $(free -g 2>/dev/null | awk '/Mem:/ {print $2 " GiB"}')"
        echo "carried: row $( [ -d "$ROW" ] && (cd "$ROW" && ls -d */ 2>/dev/null | tr -d / | tr '\n' ' ') || echo none)" \
             "| airbench $( [ -f .gpu/airbench/airbench94_muon.py ] && echo yes || echo no)" \
             "| step_speed.json $( [ -f .gpu/step_speed.json ] && echo yes || echo no)"
        echo "time boxes (s): total $TOTAL, a $A_CAP, b $B_CAP, c up to $C_MAX, d at least $D_MIN"
    } > "$OUT/env.txt" 2>&1
    cat "$OUT/env.txt"
}

unpack() {  # unpack DIR [--limit N]: the carried pack, once per machine
    local dir=$1; shift
    [ -f "$dir/.complete" ] && return 0
    rm -rf "$dir"
    $PY .data/unpack_cifar10.py "$dir" --pack .data/cifar10-jpeg75.npz "$@" && touch "$dir/.complete"
}

phase_setup() {
    if [ "$DRY" = 1 ]; then
        if [ -f .data/cifar10-jpeg75.npz ] && [ -f .data/unpack_cifar10.py ]; then
            unpack "$DATA" --limit 128
        else
            $REPORT tiny-data "$DATA" --n 128 && touch "$DATA/.complete"
        fi
    else
        [ -f .data/cifar10-jpeg75.npz ] && [ -f .data/unpack_cifar10.py ] || {
            echo "no .data/cifar10-jpeg75.npz or .data/unpack_cifar10.py: run benchmarks/gpu/prepare.sh and carry .data"; return 1; }
        unpack "$SUB" --limit 10240 && unpack "$DATA"
    fi
}

# Compiled configs of phase b (and the recipe of phase d) compiled beside phase a's tests, niced, so that
# the timed runs of b find the compiler's caches warm; their cold compile times are reported apart.
PREWARM_PIDS=()
start_prewarm() {
    [ "$DRY" = 1 ] && return 0
    selected a && selected b || return 0
    mkdir -p "$WORK/prewarm"
    local arch mode name
    for arch in "${SPEED_ARCHS[@]}"; do
        for mode in "${SPEED_MODES[@]:1}"; do
            name=${arch%%|*}__${mode%%|*}
            rm -rf "$WORK/prewarm/$name"
            # shellcheck disable=SC2086
            nice -n 10 timeout -k 5 $((A_CAP + 30)) $PY main.py ${arch#*|} ${mode#*|} "${SPEED_FLAGS[@]}" \
                --epochs 1 --eval_every 1 --save_every 1 --outdir "$WORK/prewarm/$name" > "$LOGS/prewarm_$name.txt" 2>&1 &
            PREWARM_PIDS+=($!)
        done
    done
    if selected d; then
        rm -rf "$WORK/prewarm/tta"
        # shellcheck disable=SC2046
        nice -n 10 timeout -k 5 $((A_CAP + 30)) $PY main.py $($REPORT recipe fast_airbench94_muon) \
            --dataset_dir "$DATA" --outdir "$WORK/prewarm/tta" > "$LOGS/prewarm_tta.txt" 2>&1 &
        PREWARM_PIDS+=($!)
    fi
    el "prewarm: ${#PREWARM_PIDS[@]} compiles started in the background"
}
stop_prewarm() {  # wait up to $1 s, then TERM what is left (timeout passes it on to main.py)
    [ ${#PREWARM_PIDS[@]} -gt 0 ] || return 0
    local until=$(( $(now) + $1 )) pid alive
    while :; do
        alive=0; for pid in "${PREWARM_PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=$((alive + 1)); done
        [ $alive -eq 0 ] || [ "$(now)" -ge $until ] && break
        sleep 2
    done
    for pid in "${PREWARM_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
    for pid in "${PREWARM_PIDS[@]}"; do wait "$pid" 2>/dev/null; done
    el "prewarm: done ($alive still compiling were stopped)"
    PREWARM_PIDS=()
}

# ---- phase a: correctness ------------------------------------------------------------------------
phase_a() {
    local tests=(-m pytest -q -m gpu) syncs prc=0 src
    if [ "$DRY" = 1 ]; then  # every gpu test skips without CUDA; collecting them alone takes seconds
        echo "not run: GPU_DRY=1 (without CUDA every gpu test skips)" > "$LOGS/pytest_gpu.txt"
    else
        el "a: $PY ${tests[*]}"
        bounded 60 $PY "${tests[@]}" > "$LOGS/pytest_gpu.txt" 2>&1; prc=$?
    fi
    tail -4 "$LOGS/pytest_gpu.txt"
    rm -rf "$WORK/runs/syncs" "$WORK/syncs.json"
    syncs=(benchmarks/gpu/count_syncs.py . --json "$WORK/syncs.json" --arch resnet_preact --depth 20 --epochs 2
           --scheduler cosine --dataset_dir "$SUB" --no-tensorboard --outdir "$WORK/runs/syncs" "${DEV[@]}")
    [ "$DRY" = 1 ] && syncs+=(--batch_size 32)
    el "a: $PY ${syncs[*]}"
    bounded 40 $PY "${syncs[@]}" > "$LOGS/syncs.txt" 2>&1; src=$?
    grep -E "^SYNCS|^epoch" "$LOGS/syncs.txt"
    $REPORT correctness --pytest_log "$LOGS/pytest_gpu.txt" --pytest_rc $prc --pytest_command "${tests[*]}" \
        --syncs_json "$WORK/syncs.json" --syncs_rc $src --syncs_command "${syncs[*]}" --out "$OUT/correctness.json"
}

# ---- phase b: step speed -------------------------------------------------------------------------
phase_b() {
    local dir=$WORK/speed names=() arch mode name an mn need cap
    rm -rf "$dir"; mkdir -p "$dir"
    for arch in "${SPEED_ARCHS[@]}"; do for mode in "${SPEED_MODES[@]}"; do
        names+=("${arch%%|*}__${mode%%|*}")
    done; done
    report_speed() {
        $REPORT step-speed --dir "$dir" --prewarm "$WORK/prewarm" --expect "${names[@]}" --batch_size $SPEED_BATCH \
            --flags "${SPEED_FLAGS[*]}" $([ "$DRY" = 1 ] && echo --dry) --out "$OUT/step_speed.json" "$@"
    }
    for arch in "${SPEED_ARCHS[@]}"; do for mode in "${SPEED_MODES[@]}"; do
        an=${arch%%|*}; mn=${mode%%|*}; name=${an}__${mn}
        if [ "$DRY" = 1 ] && [ "$name" != resnet_preact20__eager ]; then
            echo "GPU_DRY=1: only resnet_preact20 eager runs on the CPU (compiling needs the GPU's Triton, the larger models minutes)" > "$dir/$name.skip"
            continue
        fi
        if [ "$mn" = eager ]; then need=15; cap=45; else need=25; cap=100; fi
        if [ "$(left)" -lt $need ]; then
            echo "phase b's time box: $(left)s left, a run needs about ${need}s" > "$dir/$name.skip"; continue
        fi
        el "b: $name"
        # shellcheck disable=SC2086
        bounded $cap $PY main.py ${arch#*|} ${mode#*|} "${SPEED_FLAGS[@]}" --outdir "$dir/$name" > "$LOGS/speed_$name.txt" 2>&1
        echo $? > "$dir/$name.rc"
        report_speed
    done; done
    report_speed --table
    cp "$OUT/step_speed.json" "$WORK/step_speed.json"
}

# ---- phase c: the published row ------------------------------------------------------------------
phase_c() {
    local picked mode mflags why rest start stop_in s pid t line last=0 seeds_run=() pids=()
    mkdir -p "$ROW"
    stop_in=$(( $(left) - 25 ))  # SIGTERM then; main.py finishes its step, writes checkpoint.pth, exits 143
    if [ $stop_in -lt 20 ]; then
        $REPORT row --row "$ROW" --seeds $SEEDS --epochs "$ROW_EPOCHS" --why "not run: ${stop_in}s to train" \
            $([ "$DRY" = 1 ] && echo --dry) --out "$OUT/row.json"
        return 0
    fi
    picked=$($REPORT pick --seconds $stop_in "$OUT/step_speed.json" "$WORK/step_speed.json" .gpu/step_speed.json)
    mode=${picked%%$'\t'*}; rest=${picked#*$'\t'}; mflags=${rest%%$'\t'*}; why=${rest#*$'\t'}
    el "c: path $mode ($why)"
    start=$($REPORT epochs-done --row "$ROW" --seeds $SEEDS)
    for s in $SEEDS; do
        if [ -f "$ROW/$s/summary.json" ]; then el "c: seed $s finished in an earlier call"; continue; fi
        echo "=== $(date -u +%FT%TZ) session.sh: mode $mode, SIGTERM after ${stop_in}s" >> "$LOGS/row_$s.txt"
        # shellcheck disable=SC2086
        timeout --preserve-status -k 20 $stop_in $PY main.py "${ROW_FLAGS[@]}" --seed $s --outdir "$ROW/$s" \
            --resume $mflags >> "$LOGS/row_$s.txt" 2>&1 &
        pids+=($!); seeds_run+=($s)
    done
    el "c: ${#pids[@]} runs: $PY main.py ${ROW_FLAGS[*]} --seed S --outdir $ROW/S --resume $mflags"
    while :; do
        local alive=0; for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=$((alive + 1)); done
        [ $alive -eq 0 ] && break
        sleep 2; t=$(now)
        if [ $((t - last)) -ge 30 ]; then
            last=$t
            for s in "${seeds_run[@]}"; do
                line=$(tr '\r' '\n' < "$LOGS/row_$s.txt" | grep -aE '^epoch [0-9]+/' | tail -1)
                [ -n "$line" ] && echo "  seed $s: $line"
            done
            pack_row
        fi
    done
    mkdir -p "$WORK/row_rc"; rm -f "$WORK"/row_rc/*
    for i in "${!pids[@]}"; do wait "${pids[$i]}"; echo $? > "$WORK/row_rc/${seeds_run[$i]}"; done
    for s in "${seeds_run[@]}"; do tr '\r' '\n' < "$LOGS/row_$s.txt" | grep -av 'it/s\]' | grep -a . | tail -2 | sed "s/^/  seed $s: /"; done
    $REPORT row --row "$ROW" --rc_dir "$WORK/row_rc" --seeds $SEEDS --epochs "$ROW_EPOCHS" --start $start --mode "$mode" --why "$why" \
        --row_command "main.py ${ROW_FLAGS[*]} --seed S --outdir .gpu/row/S --resume $mflags" \
        $([ "$DRY" = 1 ] && echo --dry) --out "$OUT/row.json"
    pack_row
}

# ---- phase d: time to accuracy -------------------------------------------------------------------
phase_d() {
    local l runs reserve=0 rc airbench=() note="" dev=() tta
    l=$(left)
    if [ "$l" -lt "$D_MIN" ]; then
        $REPORT tta --skipped "only ${l}s left in this call (phase d needs ${D_MIN}s)" \
            $([ "$DRY" = 1 ] && echo --dry) --out "$OUT/tta.json"
        return 0
    fi
    if [ "$DRY" = 1 ]; then
        note="GPU_DRY=1: airbench94_muon.py needs CUDA; "
    elif [ -f .gpu/airbench/airbench94_muon.py ] && [ "$l" -ge $((90 + 300)) ]; then
        reserve=300  # its max-autotune compile took 215 s in an earlier call, before its first run
    elif [ -f .gpu/airbench/airbench94_muon.py ]; then
        note="airbench94_muon.py was carried but not run: ${l}s left, it needs about 300s beside ours (max-autotune compile 215s); "
    fi
    runs=$(( (l - reserve - 60) / 15 )); [ $runs -lt 1 ] && runs=1; [ $runs -gt 10 ] && runs=10
    tta=(benchmarks/time_to_accuracy.py --runs $runs --recipe fast_airbench94_muon --keep "$WORK/tta" --json "$WORK/tta_ours.json")
    [ "$DRY" = 1 ] && { tta=(benchmarks/time_to_accuracy.py --runs 1 --warmup_runs 0 --recipe fast_airbench94_muon
                             --keep "$WORK/tta" --json "$WORK/tta_ours.json"); runs=1
                        dev=(--device cpu --compile false --epochs 1 --whiten_bias_epochs 1 --batch_size 64); }
    rm -rf "$WORK/tta" "$WORK/tta_ours.json"
    el "d: $PY ${tta[*]} -- --dataset_dir $DATA ${dev[*]}"
    bounded $((l - reserve)) $PY "${tta[@]}" -- --dataset_dir "$DATA" "${dev[@]}" > "$LOGS/tta_ours.txt" 2>&1; rc=$?
    grep -avE "^epoch" "$LOGS/tta_ours.txt" | tail -4
    if [ $reserve -gt 0 ]; then
        el "d: airbench94_muon.py"
        mkdir -p "$WORK/airbench" && cp .gpu/airbench/airbench94_muon.py "$WORK/airbench/" &&
            $PY benchmarks/gpu/make_airbench_data.py "$DATA" "$WORK/airbench/cifar10" > /dev/null &&
            (cd "$WORK/airbench" && bounded $reserve $PY airbench94_muon.py > "$LOGS/airbench94_muon.txt" 2>&1)
        grep -a eval "$LOGS/airbench94_muon.txt" | tail -2
        airbench=(--airbench "$LOGS/airbench94_muon.txt")
    fi
    $REPORT tta --ours "$WORK/tta_ours.json" --keep "$WORK/tta" --rc $rc --runs_planned $runs "${airbench[@]}" \
        --note "$note" $([ "$DRY" = 1 ] && echo --dry) --out "$OUT/tta.json"
}

if [ "${1:-}" = __phase ]; then
    "phase_$2"
    exit $?
fi

# ---- the call ------------------------------------------------------------------------------------
export START=${START:-$(now)}; export END=$((START + TOTAL))
rm -rf "$LOGS"; mkdir -p "$OUT" "$LOGS" || exit 2
exec > >(tee -a "$OUT/session.log") 2>&1
TEE_PID=$!
el "session.sh: OUT=$OUT WORK=$WORK ROW=$ROW PHASES='$PHASES' DRY=$DRY"
write_env
el "setup: data into $WORK"
timeout -k 5 120 bash "$SCRIPT" __phase setup > "$LOGS/setup.txt" 2>&1 || echo "setup failed (exit $?)"
tail -3 "$LOGS/setup.txt"
start_prewarm

declare -A CAPS=([a]=$A_CAP [b]=$B_CAP [c]=$C_MAX [d]=9999)
declare -A FILES=([a]=correctness.json [b]=step_speed.json [c]=row.json [d]=tta.json)  # session_report.RESULT_FILES
for phase in a b c d; do
    file=${FILES[$phase]}
    if ! selected $phase; then
        $REPORT ensure --out "$OUT/$file" --phase $phase --rc not-run --why "not in PHASES='$PHASES'"
        continue
    fi
    [ $phase = b ] && stop_prewarm 30
    t0=$(now); cap=${CAPS[$phase]}
    case $phase in  # c leaves 25 s for d's note and the packing; d takes what is left but 10 s
        c) l=$((END - t0 - 25)) ;;
        *) l=$((END - t0 - 10)) ;;
    esac
    [ $cap -gt $l ] && cap=$l
    if [ $cap -lt 5 ]; then
        $REPORT ensure --out "$OUT/$file" --phase $phase --rc 124 --seconds 0 --why "no time left in this call"
        el "phase $phase: no time left"; continue
    fi
    el "phase $phase: up to ${cap}s"
    rm -f "$OUT/$file"
    PHASE_DEADLINE=$((t0 + cap)) timeout -k 10 $((cap + 15)) bash "$SCRIPT" __phase $phase
    rc=$?
    $REPORT ensure --out "$OUT/$file" --phase $phase --rc $rc --seconds $(( $(now) - t0 ))
    el "phase $phase: exit $rc after $(( $(now) - t0 ))s"
    pack_logs
done
stop_prewarm 0
pack_logs
el "done"
$REPORT check "$OUT"; rc=$?
exec >&- 2>&-; wait $TEE_PID 2>/dev/null
exit $rc
