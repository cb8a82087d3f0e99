#!/bin/bash
# Reproduction (issue 9 part 4): ResNet-preact-20, 200 epochs, cosine lr 0.2 (published 7.60, median of 3).
# Ours: seeds 0 1 2 through main.py; the original tool once (seed 17), all four sharing the GPU, launched
# with setsid under /tmp/repro so they outlive this call; repro_wait.sh polls and collects.
G=$PWD/.gpu; W=/tmp/repro; mkdir -p $W/runs
cp -r $G/src $W/src; cp -r $G/hysts $W/hysts; cp $G/run_hysts.py $G/repro_wait.sh $W/
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv
  python -c "import torch,torchvision;print('torch',torch.__version__,'tv',torchvision.__version__,'cuda',torch.version.cuda,'cudnn',torch.backends.cudnn.version())"
  date -u; echo "src $(cat $G/src_commit.txt)"; } > $W/runs/env.txt 2>&1
python $G/data/unpack_cifar10.py $W/data --pack $G/data/cifar10-jpeg75.npz > /dev/null || exit 1
mkdir -p ~/.torchvision/datasets/CIFAR10 && ln -sfn $W/data/cifar-10-batches-py ~/.torchvision/datasets/CIFAR10/cifar-10-batches-py
cd $W/runs
setsid bash -c "OMP_NUM_THREADS=4 python $W/run_hysts.py --arch resnet_preact --depth 20 --block_type basic --base_lr 0.2 \
  --scheduler cosine --epochs 200 --outdir $W/runs/hysts_rp20 > $W/runs/hysts_rp20.txt 2>&1; echo rc=\$? > $W/runs/hysts_rp20.done" < /dev/null &
for s in 0 1 2; do
  setsid bash -c "cd $W/src && OMP_NUM_THREADS=2 python main.py --arch resnet_preact --depth 20 --epochs 200 --scheduler cosine \
    --base_lr 0.2 --seed $s --eval_every 5 --no-tensorboard --dataset_dir $W/data --outdir $W/runs/reg_rp20/plain/$s \
    > $W/runs/ours_$s.txt 2>&1; echo rc=\$? > $W/runs/ours_$s.done" < /dev/null &
done
sleep 2; echo launched; cat $W/runs/env.txt
bash $W/repro_wait.sh ${1:-500}
