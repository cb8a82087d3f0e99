#!/bin/bash
# Run here, before a device call of benchmarks/gpu/session.sh: fills the ignored folders that travel
# (.data/ and .gpu/), checks that what travels stays under the device tool's 64 MiB, and prints the
# exact call. It fetches nothing from the network.
#
#   benchmarks/gpu/prepare.sh                 # first call
#   benchmarks/gpu/prepare.sh RETURNED_DIR    # after a call: RETURNED_DIR is where its $OUT files came back
#                                             # (files_at); its row.tgz becomes .gpu/row, resumed next time
#
# .data/cifar10-jpeg75.npz, unpack_cifar10.py   a JPEG copy of CIFAR-10 and its unpack script (not in a clone),
#                                               copied from SHARED_DATA=DIR (default ../shared/data, where the
#                                               development machines keep them)
# .gpu/commit.txt                               the commit under test (git may not work on the device copy)
# .gpu/row/<seed>/                              the published row's runs, to resume (from a returned row.tgz);
#                                               a finished seed keeps log.json/summary.json/config.json only, its
#                                               weights move to .gpu/finished/ (not carried: 64 MiB)
# .gpu/step_speed.json                          phase b's figures of the last call (phase c's path if b is not run)
# .gpu/airbench/airbench94_muon.py              KellerJordan/cifar10-airbench, unchanged, optional: fetch it with the
#                                               agent's fetch tool (github:KellerJordan/cifar10-airbench), which leaves
#                                               a git mirror in /work/.mirror/KellerJordan+cifar10-airbench/repo; this
#                                               script copies the file from that mirror (AIRBENCH_GIT=... for another)
set -eu
ROOT=$(cd "$(dirname "$(readlink -f "$0")")/../.." && pwd)
cd "$ROOT"
SHARED=${SHARED_DATA:-$ROOT/../shared/data}
AIRBENCH_GIT=${AIRBENCH_GIT:-/work/.mirror/KellerJordan+cifar10-airbench/repo}
LIMIT=$((64 * 1024 * 1024))
RETURNED=${1:-}

for path in .data/x .gpu/x; do
    git check-ignore -q "$path" || { echo "prepare.sh: ${path%/x}/ is not ignored by git (.gitignore): it would travel as untracked files and could be committed"; exit 1; }
done
mkdir -p .data .gpu

# the data pack
for name in cifar10-jpeg75.npz unpack_cifar10.py; do
    if ! cmp -s "$SHARED/$name" ".data/$name" 2>/dev/null; then
        [ -f "$SHARED/$name" ] || { echo "prepare.sh: no $SHARED/$name (set SHARED_DATA)"; exit 1; }
        install -m 644 "$SHARED/$name" ".data/$name"
        echo "copied $SHARED/$name to .data/"
    fi
done

# the commit under test: the device copy is this working tree, uncommitted changes included
{
    echo "$(git rev-parse HEAD) ($(git branch --show-current 2>/dev/null || echo detached); prepared $(date -u +%FT%TZ))"
    changes=$(git status --porcelain --untracked-files=normal | grep -v '^??' | awk '{print $2}' | tr '\n' ' ')
    untracked=$(git status --porcelain --untracked-files=all | grep '^??' | awk '{print $2}' | tr '\n' ' ')
    [ -n "$changes" ] && echo "  with uncommitted changes to: $changes"
    [ -n "$untracked" ] && echo "  with untracked files: $untracked"
    true
} > .gpu/commit.txt
cat .gpu/commit.txt

# what the last call brought back
if [ -n "$RETURNED" ]; then
    [ -d "$RETURNED" ] || { echo "prepare.sh: $RETURNED is not a folder"; exit 1; }
    if [ -f "$RETURNED/row.tgz" ]; then
        rm -rf .gpu/row.new && mkdir -p .gpu/row.new
        tar xzf "$RETURNED/row.tgz" -C .gpu/row.new
        [ -d .gpu/row.new/row ] || { echo "prepare.sh: $RETURNED/row.tgz holds no row/ folder"; exit 1; }
        rm -rf .gpu/row && mv .gpu/row.new/row .gpu/row && rm -rf .gpu/row.new
        echo "row: .gpu/row from $RETURNED/row.tgz"
    fi
    [ -f "$RETURNED/step_speed.json" ] && cp "$RETURNED/step_speed.json" .gpu/step_speed.json &&
        echo "step speed: .gpu/step_speed.json from $RETURNED"
fi
if [ -d .gpu/row ]; then
    for run in .gpu/row/*/; do
        seed=$(basename "$run")
        if [ -f "$run/summary.json" ] && ls "$run"/*.pth > /dev/null 2>&1; then
            mkdir -p ".gpu/finished/$seed" && mv "$run"/*.pth ".gpu/finished/$seed/"
            echo "row: seed $seed finished; its weights moved to .gpu/finished/$seed (not carried)"
        fi
        echo "row: seed $seed: $(python3 -c "import json,sys; l=[r for r in json.load(open(sys.argv[1])) if r.get('epoch', 0) > 0]; print(f'{l[-1][\"epoch\"]} epochs done' if l else 'no epoch yet')" "$run/log.json" 2>/dev/null || echo 'no log.json')$( [ -f "$run/checkpoint.pth" ] && echo ', checkpoint.pth')$( [ -f "$run/summary.json" ] && echo ', finished')"
    done
fi

# airbench, from the fetch tool's mirror
if [ ! -f .gpu/airbench/airbench94_muon.py ] && git --git-dir="$AIRBENCH_GIT" rev-parse HEAD > /dev/null 2>&1; then
    mkdir -p .gpu/airbench
    git --git-dir="$AIRBENCH_GIT" show HEAD:airbench94_muon.py > .gpu/airbench/airbench94_muon.py
    echo "KellerJordan/cifar10-airbench $(git --git-dir="$AIRBENCH_GIT" rev-parse --short HEAD), unchanged" > .gpu/airbench/SOURCE
    echo "airbench: .gpu/airbench/airbench94_muon.py from $AIRBENCH_GIT"
fi
[ -f .gpu/airbench/airbench94_muon.py ] ||
    echo "airbench: none (optional; fetch github:KellerJordan/cifar10-airbench with the fetch tool, then run this again)"

# what travels: tracked and untracked-not-ignored files, shared/ if the checkout has one, the carried paths
CARRY=(.data)
for path in .gpu/commit.txt .gpu/row .gpu/step_speed.json .gpu/airbench; do
    [ -e "$path" ] && CARRY+=("$path")
done
tree=$(git ls-files -co --exclude-standard -z | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
shared=0; [ -d shared ] && ! git check-ignore -q shared && shared=$(du -sb shared | cut -f1)
carried=$(du -sbc "${CARRY[@]}" | tail -1 | cut -f1)
total=$((tree + shared + carried))
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo "travels: working tree $(mib $tree)$( [ $shared -gt 0 ] && echo ", shared/ $(mib $shared)"), carried $(mib $carried)" \
     "($(du -sbc "${CARRY[@]}" | head -n -1 | awk '{printf "%s %.1f MiB, ", $2, $1 / 1048576}' | sed 's/, $//')):" \
     "$(mib $total) of 64 MiB"
if [ $total -ge $LIMIT ]; then
    echo "prepare.sh: over the device tool's 64 MiB; drop .gpu/airbench or move finished runs out of .gpu/row"
    exit 1
fi
list=$(printf '"%s", ' "${CARRY[@]}"); list="[${list%, }]"
cat <<EOF

device call (the device tool sends the checkout its session started in: run this there):
  run  command:   bash benchmarks/gpu/session.sh
       carry:     $list
       timeout_s: 540
rerun only some phases (e.g. after one failed):  PHASES="a b" bash benchmarks/gpu/session.sh
afterwards:  benchmarks/gpu/prepare.sh FILES_AT   (FILES_AT: the folder the call's files came back to)
EOF
