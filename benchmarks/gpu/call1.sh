#!/bin/bash
# Device call 1: correctness on the GPU (test suite, every family in bf16+channels_last, eager and
# compiled; host syncs), then timing alone on the GPU: the original tool's epochs, ours, throughput.
export PYTHONUNBUFFERED=1
G=$PWD/.gpu; S=$G/src; R=$OUT; mkdir -p $R/logs
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit,temperature.gpu --format=csv
  python -c "import torch,torchvision;print('torch',torch.__version__,'tv',torchvision.__version__,'cuda',torch.version.cuda,'cudnn',torch.backends.cudnn.version())"
  nproc; } > $R/env.txt 2>&1
cd $G && python data/unpack_cifar10.py data/ >/dev/null && python data/unpack_cifar10.py data/c10k --limit 10000 >/dev/null
mkdir -p ~/.torchvision/datasets/CIFAR10 && ln -sfn $G/data/cifar-10-batches-py ~/.torchvision/datasets/CIFAR10/cifar-10-batches-py
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
el setup done
# ---- phase 1: correctness (not timed): CPU suite in the background, families pool
(cd $S && timeout 280 python -m pytest -q -n 6 -p xdist > $R/logs/pytest_full.txt 2>&1; echo "rc=$?" >> $R/logs/pytest_full.txt) &
PY=$!
fam() {  # name mode extra-flags...
  local a=$1 m=$2; shift 2
  local c=""; [ $m = compiled ] && c="--compile"
  local t0=$(date +%s.%N)
  timeout 250 python $S/main.py --arch $a "$@" --epochs 1 --dataset_dir $G/data/c10k --precision bf16 --channels_last $c \
     --no-tensorboard --outdir $G/runs/fam_${m}_$a > $R/logs/fam_${m}_$a.txt 2>&1
  echo "$a $m rc=$? wall=$(python -c "print(round($(date +%s.%N)-$t0,1))")" >> $R/logs/families.txt
}
export -f fam; export S G R
( printf '%s\n' "vgg eager" "resnet eager" "resnet_preact eager" "se_resnet_preact eager" "wrn eager" \
   "densenet eager" "pyramidnet eager" "resnext eager" "shake_shake eager" "resnet9 eager" \
   "vgg compiled" "resnet compiled --depth 20" "resnet_preact compiled --depth 20" "se_resnet_preact compiled --depth 20" \
   "wrn compiled --depth 16 --widening_factor 8" "densenet compiled" "pyramidnet compiled --depth 110 --pyramid_alpha 84 --block_type basic" \
   "resnext compiled --cardinality 4" "shake_shake compiled --base_channels 32" "resnet9 compiled" \
  | xargs -P 8 -L 1 bash -c 'fam "$@"' _ )
wait $PY
el families and cpu suite done; tail -3 $R/logs/pytest_full.txt; cat $R/logs/families.txt
(cd $S && timeout 200 python -m pytest -q -m gpu > $R/logs/pytest_gpu.txt 2>&1; echo "rc=$?" >> $R/logs/pytest_gpu.txt); tail -3 $R/logs/pytest_gpu.txt
el gpu tests done
for e in 1 2; do timeout 60 python count_syncs.py $S --arch resnet_preact --depth 20 --epochs $e --dataset_dir $G/data/c10k \
  --no-tensorboard --outdir $G/runs/sync$e 2>&1 | grep SYNCS | tee -a $R/logs/syncs.txt; done
el syncs done
# ---- phase 2: timing, one job at a time on the GPU
H() { local n=$1; shift; timeout 150 python $G/run_hysts.py "$@" --test_first false --outdir $G/runs/hysts_$n > $R/logs/hysts_$n.txt 2>&1; grep -E "Elapsed|Accuracy" $R/logs/hysts_$n.txt | tail -6 | sed "s/^/hysts_$n /"; }
H rp20 --arch resnet_preact --depth 20 --block_type basic --base_lr 0.2 --scheduler cosine --epochs 3
H rp56 --arch resnet_preact --depth 56 --block_type basic --epochs 2
H wrn --arch wrn --depth 28 --widening_factor 10 --epochs 2
el hysts done
O() { local n=$1; shift; timeout 150 python $S/main.py "$@" --dataset_dir $G/data --no-tensorboard --outdir $G/runs/ours_$n > $R/logs/ours_$n.txt 2>&1; cp $G/runs/ours_$n/log.json $R/logs/ours_$n.log.json 2>/dev/null; grep -E "^epoch" $R/logs/ours_$n.txt | sed "s/^/ours_$n /"; }
O rp20_fp32 --arch resnet_preact --depth 20 --base_lr 0.2 --scheduler cosine --epochs 3
O rp20_bf16cl --arch resnet_preact --depth 20 --base_lr 0.2 --scheduler cosine --epochs 3 --precision bf16 --channels_last
O rp56_bf16cl --arch resnet_preact --depth 56 --epochs 2 --precision bf16 --channels_last
O wrn_bf16cl --arch wrn --epochs 2 --precision bf16 --channels_last
el ours done
timeout 150 python $S/benchmarks/throughput.py --dataset_dir $G/data --archs wrn28_10 resnet_preact56 densenet_bc100 shake_shake26_2x32d \
  --device cuda --precision bf16 --channels_last --pipelines device --steps 100 --json $R/throughput_eager.json 2>&1 | tee $R/logs/throughput_eager.txt | grep -v Warn
el throughput done
tar czf $R/runs_logs.tgz -C $G/runs --exclude='*.pth' . 2>/dev/null
