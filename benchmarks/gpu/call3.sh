#!/bin/bash
# Device call 3: airbench94_muon (unchanged) and our recipe again side by side; host syncs of the
# default path after the fix; throughput (device pipeline vs no data loading), eager and compiled.
export PYTHONUNBUFFERED=1
G=$PWD/.gpu; S=$G/src; R=$OUT; mkdir -p $R/logs $G/runs
T0=$(date +%s); DEADLINE=$((T0 + 490))
left() { local l=$((DEADLINE - $(date +%s))); [ $l -lt $1 ] && echo $l || echo $1; }
el() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.limit,temperature.gpu --format=csv > $R/env.txt 2>&1
cd $G && python data/unpack_cifar10.py data/ >/dev/null && python data/unpack_cifar10.py data/c10k --limit 10000 >/dev/null && python make_airbench_data.py data airbench/cifar10 > /dev/null
el setup done
cd $G/airbench && timeout $(left 265) python airbench94_muon.py > $R/airbench94_muon.txt 2> $R/logs/airbench94_muon.err
grep -c eval $R/airbench94_muon.txt; grep eval $R/airbench94_muon.txt | tail -2
el airbench94_muon done
cd $S && timeout $(left 100) python benchmarks/time_to_accuracy.py --runs 5 --recipe fast_airbench94_muon \
   --keep $G/runs/tta --json $R/tta_ours.json -- --dataset_dir $G/data 2> $R/logs/tta_ours.err | tee $R/tta_ours.txt | grep -v "^epoch"
el ours done
for e in 1 2; do timeout $(left 30) python $G/count_syncs.py $S --arch resnet_preact --depth 20 --epochs $e --dataset_dir $G/data/c10k \
  --no-tensorboard --outdir $G/runs/sync$e 2>&1 | grep SYNCS | tee -a $R/syncs.txt; done
el syncs done
timeout $(left 70) python $S/benchmarks/throughput.py --dataset_dir $G/data --archs wrn28_10 resnet_preact56 densenet_bc100 shake_shake26_2x32d \
  --device cuda --precision bf16 --channels_last --pipelines device --steps 100 --json $R/logs/throughput_eager.json 2>&1 | grep -v Warn | tee $R/throughput.txt
el throughput eager done
timeout $(left 200) python $S/benchmarks/throughput.py --dataset_dir $G/data --archs resnet_preact56 wrn28_10 densenet_bc100 shake_shake26_2x32d \
  --device cuda --precision bf16 --channels_last --compile --pipelines device --steps 100 --json $R/logs/throughput_compiled.json 2>&1 | grep -v Warn | tee -a $R/throughput.txt
el throughput compiled done
tar czf $R/logs.tgz -C $R logs && rm -rf $R/logs
