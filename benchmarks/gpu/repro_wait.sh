#!/bin/bash
# Poll the four reproduction runs for up to $1 seconds, printing progress and copying logs,
# run folders and our checkpoints (for --resume in a later session) into $OUT after each poll.
W=/tmp/repro; END=$(( $(date +%s) + ${1:-500} ))
while :; do
  n=$(ls $W/runs/*.done 2>/dev/null | wc -l)
  echo "== $(date -u +%T) finished $n/4"
  for f in $W/runs/ours_0.txt $W/runs/ours_1.txt $W/runs/ours_2.txt; do echo "$(basename $f): $(grep -E '^epoch' $f | tail -1)"; done
  echo "hysts: $(grep -E 'Epoch|Elapsed|Accuracy' $W/runs/hysts_rp20.txt | tail -2 | tr '\n' ' ')"
  tar czf $OUT/repro.tgz.tmp -C $W runs 2>/dev/null && mv $OUT/repro.tgz.tmp $OUT/repro.tgz
  [ $n -ge 4 ] && break
  [ $(date +%s) -ge $END ] && break
  sleep 30
done
cat $W/runs/*.done 2>/dev/null; tail -2 $W/runs/ours_*.txt; tail -3 $W/runs/hysts_rp20.txt
