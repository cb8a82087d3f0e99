#!/bin/bash
# Device call 2: time to 94% side by side on one GPU: our fast_airbench94_muon recipe through
# main.py (benchmarks/time_to_accuracy.py), then airbench94_muon.py and airbench94.py unchanged.
export PYTHONUNBUFFERED=1
G=$PWD/.gpu; S=$G/src; R=$OUT; mkdir -p $R/logs $G/runs
T0=$(date +%s); DEADLINE=$((T0 + 565))
left() { local l=$((DEADLINE - $(date +%s))); [ $l -lt $1 ] && echo $l || echo $1; }
el() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit,temperature.gpu --format=csv
  python -c "import torch,torchvision;print('torch',torch.__version__,'tv',torchvision.__version__,'cuda',torch.version.cuda,'cudnn',torch.backends.cudnn.version())"; } > $R/env.txt 2>&1
cd $G && python data/unpack_cifar10.py data/ >/dev/null && python make_airbench_data.py data airbench/cifar10 > /dev/null
el setup done
cd $S && timeout $(left 290) python benchmarks/time_to_accuracy.py --runs 5 --recipe fast_airbench94_muon \
   --keep $G/runs/tta --json $R/tta_ours.json -- --dataset_dir $G/data 2> $R/logs/tta_ours.err | tee $R/tta_ours.txt | grep -v "^epoch"
el ours done
cd $G/airbench && timeout $(left 150) python airbench94_muon.py > $R/airbench94_muon.txt 2> $R/logs/airbench94_muon.err
grep -E "eval|Mean" $R/airbench94_muon.txt | tail -4
el airbench94_muon done
timeout $(left 90) python airbench94.py > $R/airbench94.txt 2> $R/logs/airbench94.err
grep -E "eval|Mean" $R/airbench94.txt | tail -3
el airbench94 done
cp $G/runs/tta/seed0/log.json $R/logs/ours_seed0_log.json 2>/dev/null; cp $G/runs/tta/seed0/config.json $R/logs/ours_seed0_config.json 2>/dev/null
tar czf $R/logs.tgz -C $R logs && rm -rf $R/logs
