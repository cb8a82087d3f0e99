#!/usr/bin/env bash
# The experiments behind the figures the original tool (hysts/pytorch_image_classification) published
# in its README's tables of test error, the fast-training recipes (the DAWNBench ResNet-9 and
# airbench line) and this project's CPU checks, each row with the settings behind its figure.
#
#   ./run_experiments.sh --list [NAME...]     # one line per row: NAME, published error %, runs, command
#   ./run_experiments.sh NAME... [--seeds 0,1,2] [--epochs K] [--dry] [--results DIR] [-- FLAGS...]
#
# NAME is a row (rp56/cutout: runs go to results/rp56/cutout/<seed>/), a prefix of rows (rp56: all
# of them) or a table (resnet_preact56_ablation; --help lists the tables).
#   --seeds 0,1,2   the seeds (env SEEDS="0 1 2" too). Default: as many as the published figure is
#                   the median of (5 for rp56, 1 for a "1 run" figure), 3 where no count is published
#   --epochs K      a quick check: every run trains K epochs into results/NAME_epK/<seed>/, never
#                   into the full run's directory; the row's --milestones, --warmup_epochs and
#                   --whiten_bias_epochs are scaled by K / its --epochs (arch defaults are left out:
#                   main.py checks only the ones a row gives)
#   --dry           print the commands (with --resume where it applies) and the skipped runs (env DRY=1)
#   --results DIR   the folder of the run directories (default results/, where git ignores your runs:
#                   the project's own measurements there are listed in results/.gitignore; env RESULTS_DIR)
#   -- FLAGS        main.py flags for every run, after the row's own so they win (env EXTRA="FLAGS")
# A run directory holding summary.json for the requested number of epochs is skipped; any other
# non-empty one (checkpoint.pth or log.json of an interrupted run) is continued with --resume; a new
# one is started. A run that fails stops the script with main.py's exit status. Relative paths are
# relative to this script's folder.
#
# Published figures, read by --list and summarize.py, are the lines
#   # published: NAME ERROR RUNS
# just above their rows: NAME is the row's name (its runs are results/NAME/<seed>/), ERROR the
# published test error in % at the last epoch (CIFAR-10 unless the row names another dataset), RUNS
# the rest of the line ("median of 3", "1 run", "mean of 200"). In Python:
#   re.match(r'^\s*#\s*published:\s+(\S+)\s+(\d+(?:\.\d*)?)\s*(.*?)\s*$', line)
# A row without such a line has no published figure. `row NAME FLAGS...` runs
# ./main.py FLAGS --seed S --outdir results/NAME/S; `norun NAME REASON` stands for a published
# figure main.py has no way to reproduce. Settings quoted below come from the original tool's
# README (hysts/pytorch_image_classification on GitHub: the command lines of its flat-flag main.py,
# and of the later train.py version for the batch-size, LARS, ghost-BN and precision tables) and,
# where those are silent, from the repository's history.
set -euo pipefail
cd "$(dirname "$0")"
SCRIPT=$(pwd)/$(basename "$0")

# --- CIFAR-10, the original tool's architecture table ---
# Every row names its --epochs (the arch default) so a finished run can be recognized; the other
# settings are the arch defaults (./main.py --list_archs), the original tool's configs.
architectures() {
    # published: vgg15 7.29 median of 3
    row vgg15 --arch vgg --epochs 160
    # published: resnet110 6.52 median of 3
    row resnet110 --arch resnet --depth 110 --block_type basic --epochs 160
    # published: resnet_preact110 6.47 median of 3
    row resnet_preact110 --arch resnet_preact --depth 110 --block_type basic --epochs 160
    # published: resnet_preact164 5.90 median of 3
    row resnet_preact164 --arch resnet_preact --depth 164 --block_type bottleneck --epochs 160
    # The README's note: "Trained WRN-28-10 with batch size 64 (128 in paper)"; its command line
    # (--arch wrn --depth 28 --widening_factor 10) leaves the 64 out. lr stays 0.1.
    # published: wrn28_10 4.03 median of 3
    row wrn28_10 --arch wrn --depth 28 --widening_factor 10 --batch_size 64 --epochs 200
    # No published command (config: batch 64, lr 0.1). DIFFERS: our basic DenseNet is the paper's
    # (16 stem channels, no compression); the original's basic variant has a 2k = 24-channel stem and
    # compresses its transitions by --compression_rate (0.5 unless given).
    # published: densenet100_k12 3.87 1 run
    row densenet100_k12 --arch densenet --depth 100 --block_type basic --growth_rate 12 --epochs 300
    # published: densenet_bc100 4.69 median of 3
    row densenet_bc100 --arch densenet --depth 100 --block_type bottleneck --growth_rate 12 --compression_rate 0.5 \
        --batch_size 32 --base_lr 0.05 --epochs 300
    # published: pyramidnet110_84 4.40 median of 3
    row pyramidnet110_84 --arch pyramidnet --depth 110 --block_type basic --pyramid_alpha 84 --epochs 300
    # published: pyramidnet110_270 3.92 1 run
    row pyramidnet110_270 --arch pyramidnet --depth 110 --block_type basic --pyramid_alpha 270 --epochs 300
    # No published command; the config's settings.
    # published: pyramidnet164_270 3.44 1 run
    row pyramidnet164_270 --arch pyramidnet --depth 164 --block_type bottleneck --pyramid_alpha 270 --epochs 300
    # published: resnext29_4x64d 3.89 median of 3
    row resnext29_4x64d --arch resnext --depth 29 --cardinality 4 --base_channels 64 --batch_size 32 \
        --base_lr 0.025 --epochs 300
    # published: resnext29_8x64d 3.97 1 run
    row resnext29_8x64d --arch resnext --depth 29 --cardinality 8 --base_channels 64 --batch_size 64 \
        --base_lr 0.05 --epochs 300
    # published: shake_shake26_2x32d 3.68 median of 3
    row shake_shake26_2x32d "${SSI[@]}" --base_channels 32 --epochs 1800
    # published: shake_shake26_2x64d 2.88 1 run
    row shake_shake26_2x64d "${SSI[@]}" --base_channels 64 --batch_size 64 --base_lr 0.1 --epochs 1800
    # The 2019 command and the note ("2x64d with batch size 64 and lr 0.1") give 2x96d the config's
    # batch 128 and lr 0.2; the later README's command adds batch 64 and lr 0.1.
    # published: shake_shake26_2x96d 2.90 1 run
    row shake_shake26_2x96d "${SSI[@]}" --base_channels 96 --epochs 1800
}
SSI=(--arch shake_shake --depth 26 --shake_forward true --shake_backward true --shake_image true)

# --- Regularization: "all models are trained using cosine annealing with initial learning rate 0.2"
# (batch 128) unless a command says otherwise. RICAP runs without random crop, as the original's
# RICAP commands (--use_random_crop False) and configs; Cutout is 16x16, its centre anywhere.
# "ResNet-preact-20, widening factor 4" (named WRN-20-4 until 2020) can only have been the original's
# resnet_preact with --base_channels 64 (stem and stages x4: its WRN needs depth 6n+4 and its
# resnet_preact has no widening factor); --widening_factor 4 would keep a 16-channel stem.
RP20W4=(--arch resnet_preact --depth 20 --base_channels 64 --epochs 200 --scheduler cosine --base_lr 0.2)
regularization_resnet_preact20_w4() {
    # published: reg_rp20w4/plain 4.91 1 run
    row reg_rp20w4/plain "${RP20W4[@]}"
    # published: reg_rp20w4/cutout 3.71 1 run
    row reg_rp20w4/cutout "${RP20W4[@]}" --use_cutout --cutout_size 16
    # published: reg_rp20w4/ricap 3.45 1 run
    row reg_rp20w4/ricap "${RP20W4[@]}" --use_ricap --ricap_beta 0.3 --use_random_crop false
}
WRN=(--arch wrn --depth 28 --widening_factor 10 --epochs 200 --scheduler cosine)
regularization_wrn28_10() {
    # The README's command: --arch wrn --depth 28 --epochs 200 --scheduler cosine --base_lr 0.1
    # --batch_size 64 --use_cutout --cutout_size 16 (lr 0.1 and batch 64, not the table's lr 0.2).
    # published: reg_wrn/cutout 3.19 1 run
    row reg_wrn/cutout "${WRN[@]}" --base_lr 0.1 --batch_size 64 --use_cutout --cutout_size 16
    # published: reg_wrn/mixup 3.32 1 run
    row reg_wrn/mixup "${WRN[@]}" --base_lr 0.2 --use_mixup --mixup_alpha 1
    # published: reg_wrn/ricap 2.83 1 run
    row reg_wrn/ricap "${WRN[@]}" --base_lr 0.2 --use_ricap --ricap_beta 0.3 --use_random_crop false
    # Dual-Cutout as the original: two forward passes, CE averaged over the views + alpha * MSE of
    # their logits.
    # published: reg_wrn/dual_cutout 2.87 1 run
    row reg_wrn/dual_cutout "${WRN[@]}" --base_lr 0.2 --use_dual_cutout --dual_cutout_alpha 0.1 --cutout_size 16 \
        --dual_cutout_distance logits
}
SS96=("${SSI[@]}" --base_channels 96 --epochs 1800 --scheduler cosine --base_lr 0.2)
regularization_shake_shake() {
    # published: reg_ss96/cutout 2.50 1 run
    row reg_ss96/cutout "${SS96[@]}" --use_cutout --cutout_size 16
    # published: reg_ss96/mixup 2.36 1 run
    row reg_ss96/mixup "${SS96[@]}" --use_mixup --mixup_alpha 1
    # published: reg_ss96/ricap 2.10 1 run
    row reg_ss96/ricap "${SS96[@]}" --use_ricap --ricap_beta 0.3 --use_random_crop false
    # published: reg_ss96/dual_cutout 2.41 1 run
    row reg_ss96/dual_cutout "${SS96[@]}" --use_dual_cutout --dual_cutout_alpha 0.1 --cutout_size 16 \
        --dual_cutout_distance logits
}
RP20=(--arch resnet_preact --depth 20 --epochs 200 --scheduler cosine --base_lr 0.2)
regularization_resnet_preact20() {
    # published: reg_rp20/plain 7.60 median of 3
    row reg_rp20/plain "${RP20[@]}"
    # published: reg_rp20/label_smoothing_0.001 7.51 median of 3
    row reg_rp20/label_smoothing_0.001 "${RP20[@]}" --use_label_smoothing --label_smoothing_epsilon 0.001
    # published: reg_rp20/label_smoothing_0.01 7.21 median of 3
    row reg_rp20/label_smoothing_0.01 "${RP20[@]}" --use_label_smoothing --label_smoothing_epsilon 0.01
    # published: reg_rp20/label_smoothing_0.1 7.57 median of 3
    row reg_rp20/label_smoothing_0.1 "${RP20[@]}" --use_label_smoothing --label_smoothing_epsilon 0.1
    # published: reg_rp20/mixup 7.24 median of 3
    row reg_rp20/mixup "${RP20[@]}" --use_mixup --mixup_alpha 1
    # published: reg_rp20/ricap_random_crop 6.88 median of 3
    row reg_rp20/ricap_random_crop "${RP20[@]}" --use_ricap --ricap_beta 0.3 --use_random_crop true
    # published: reg_rp20/ricap 6.77 median of 3
    row reg_rp20/ricap "${RP20[@]}" --use_ricap --ricap_beta 0.3 --use_random_crop false
    # published: reg_rp20/dual_cutout 6.24 median of 3
    row reg_rp20/dual_cutout "${RP20[@]}" --use_dual_cutout --dual_cutout_alpha 0.1 --cutout_size 16 \
        --dual_cutout_distance logits
}

# --- ResNet-preact-56 ablation (lr 0.2, median of 5): the README's commands, i.e. 160 epochs,
# multistep [80,120] x0.1 unless a row says cosine. preact_stage [true,false,false] everywhere but
# the two "preactivate shortcut after downsampling" rows.
RP56=(--arch resnet_preact --depth 56 --block_type basic --base_lr 0.2)
TFF=(--preact_stage '[true,false,false]')
TTT=(--preact_stage '[true,true,true]')
resnet_preact56_ablation() {
    # published: rp56/first_relu_no_last_bn_preact_downsampling 6.45 median of 5
    row rp56/first_relu_no_last_bn_preact_downsampling "${RP56[@]}" --epochs 160 "${TTT[@]}" --remove_first_relu false --add_last_bn false
    # published: rp56/first_relu_no_last_bn 6.47 median of 5
    row rp56/first_relu_no_last_bn "${RP56[@]}" --epochs 160 "${TFF[@]}" --remove_first_relu false --add_last_bn false
    # published: rp56/no_first_relu_no_last_bn 6.14 median of 5
    row rp56/no_first_relu_no_last_bn "${RP56[@]}" --epochs 160 "${TFF[@]}" --remove_first_relu true --add_last_bn false
    # published: rp56/first_relu_last_bn 6.43 median of 5
    row rp56/first_relu_last_bn "${RP56[@]}" --epochs 160 "${TFF[@]}" --remove_first_relu false --add_last_bn true
    # published: rp56/no_first_relu_last_bn 5.85 median of 5
    row rp56/no_first_relu_last_bn "${RP56[@]}" --epochs 160 "${TFF[@]}" --remove_first_relu true --add_last_bn true
    # published: rp56/no_first_relu_last_bn_preact_downsampling 6.27 median of 5
    row rp56/no_first_relu_last_bn_preact_downsampling "${RP56[@]}" --epochs 160 "${TTT[@]}" --remove_first_relu true --add_last_bn true
    # published: rp56/cosine 5.72 median of 5
    row rp56/cosine "${RP56[@]}" --epochs 160 "${TFF[@]}" --remove_first_relu true --add_last_bn true --scheduler cosine
    # published: rp56/cutout 4.96 median of 5
    row rp56/cutout "${RP56[@]}" --epochs 160 "${TFF[@]}" --remove_first_relu true --add_last_bn true --use_cutout --cutout_size 16
    # The original erases with one U(0,1) value per rectangle, after normalization.
    # published: rp56/random_erasing 5.22 median of 5
    row rp56/random_erasing "${RP56[@]}" --epochs 160 "${TFF[@]}" --remove_first_relu true --add_last_bn true --use_random_erasing \
        --random_erasing_fill uniform
    # The command omits the length; the table says 300 epochs and its learning curves drop the lr at
    # epochs 150 and 225 (figures/experiments_resnet/wo_1st_ReLU_w_last_BN_Mixup.png).
    # published: rp56/mixup_300ep 5.11 median of 5
    row rp56/mixup_300ep "${RP56[@]}" --epochs 300 --milestones '[150,225]' "${TFF[@]}" --remove_first_relu true \
        --add_last_bn true --use_mixup --mixup_alpha 1
}

# --- Batch size, LARS, ghost BN, precision: ResNet-preact-20, cosine, 200 epochs (the -es README's
# tables and commands: train.py's resnet_preact config with depth 20, i.e. weight decay 1e-4).
BS=(--arch resnet_preact --depth 20 --epochs 200 --scheduler cosine)
batch_size_lr() {
    # published: bs/128_lr0.1 8.09 1 run
    row bs/128_lr0.1 "${BS[@]}" --batch_size 128 --base_lr 0.1
    # published: bs/1024_lr0.8 8.40 1 run
    row bs/1024_lr0.8 "${BS[@]}" --batch_size 1024 --base_lr 0.8
    # published: bs/4096_lr3.2 10.57 1 run
    row bs/4096_lr3.2 "${BS[@]}" --batch_size 4096 --base_lr 3.2
    # LARS as the original's: momentum 0.9 without Nesterov, no LARS coefficient, trust ratio
    # ||w|| / (eps + ||g|| + wd ||w||), 1 below ||w|| = thresh.
    # published: bs/4096_lars_lr0.02 8.21 median of 3
    row bs/4096_lars_lr0.02 "${BS[@]}" --batch_size 4096 --optimizer lars --base_lr 0.02 --nesterov false \
        --lars_eps 1e-9 --lars_thresh 1e-2
    # Command: base_lr 1.6, batch 4096, no_weight_decay_on_bn, weight_decay 5e-4. DIFFERS slightly:
    # the original exempts BN weights and biases; main.py also every other bias (the classifier's).
    # published: bs/4096_no_wd_on_bn 8.78 median of 3
    row bs/4096_no_wd_on_bn "${BS[@]}" --batch_size 4096 --base_lr 1.6 --no_weight_decay_on_bn --weight_decay 5e-4
    # Ghost batch 128: the table's lr 1.6 (the command above the table says 1.5).
    # published: bs/4096_ghost128 9.73 1 run
    row bs/4096_ghost128 "${BS[@]}" --batch_size 4096 --base_lr 1.6 --subdivision 32
    # The original's pure FP16 (--fp16, apex O3: the model cast to half, BN kept in float, no loss
    # scaling) diverged; main.py's fp16 is autocast mixed precision with a GradScaler (the next row).
    # published: bs/4096_fp16_pure 49.84 1 run
    norun bs/4096_fp16_pure "pure FP16 training has no main.py equivalent (--precision fp16 is mixed precision)"
    # Mixed precision: the original's --use_amp (apex O1, dynamic loss scaling).
    # published: bs/4096_mixed_precision 10.48 1 run
    row bs/4096_mixed_precision "${BS[@]}" --batch_size 4096 --base_lr 1.6 --precision fp16
    # Not in the original: bf16 autocast, for comparison with the row above.
    row bs/4096_bf16 "${BS[@]}" --batch_size 4096 --base_lr 1.6 --precision bf16
}

# --- WRN-28-10 RICAP, batch 512, 200 epochs on V100s (the -es README's multi-GPU table: lr 0.2,
# cosine, no random crop). N GPUs of batch 512/N each are emulated on one device by --subdivision N:
# BN statistics over 512/N images (no SyncBN in the original) and the gradient averaged over 512.
# DIFFERS: under DDP each GPU drew its own RICAP boxes and partners within its 512/N images; here
# one draw covers the whole batch of 512.
WRN_B512=(--arch wrn --depth 28 --widening_factor 10 --epochs 200 --scheduler cosine --base_lr 0.2 --batch_size 512
          --use_ricap --ricap_beta 0.3 --use_random_crop false)
wrn28_10_ricap_batch512() {
    # published: wrn_ricap_b512/1gpu 2.63 1 run
    row wrn_ricap_b512/1gpu "${WRN_B512[@]}"
    # published: wrn_ricap_b512/2gpus 2.71 1 run
    row wrn_ricap_b512/2gpus "${WRN_B512[@]}" --subdivision 2
    # published: wrn_ricap_b512/4gpus 2.89 1 run
    row wrn_ricap_b512/4gpus "${WRN_B512[@]}" --subdivision 4
    # published: wrn_ricap_b512/8gpus 2.75 1 run
    row wrn_ricap_b512/8gpus "${WRN_B512[@]}" --subdivision 8
}

# --- Other datasets: ResNet-preact-20, cosine from lr 0.2, batch 128 (test error of that dataset).
# FashionMNIST: pad 4, random 28x28 crop, flip (the README's note, main.py's defaults). KMNIST: crop,
# no flip. MNIST: the tool that produced the 100-epoch MNIST table (December 2018) crops only
# CIFAR/FashionMNIST unless asked (argparser.py, commit 9547e0d), hence --use_random_crop false.
RP20_DATA=(--arch resnet_preact --depth 20 --scheduler cosine --base_lr 0.2)
datasets() {
    # published: fashion_mnist/plain 5.04 median of 3
    row fashion_mnist/plain "${RP20_DATA[@]}" --dataset FashionMNIST --epochs 200
    # published: fashion_mnist/cutout 4.49 median of 3
    row fashion_mnist/cutout "${RP20_DATA[@]}" --dataset FashionMNIST --epochs 200 --use_cutout --cutout_size 16
    # published: mnist/plain 0.40 median of 3
    row mnist/plain "${RP20_DATA[@]}" --dataset MNIST --epochs 100 --use_random_crop false
    # published: mnist/cutout 0.25 median of 3
    row mnist/cutout "${RP20_DATA[@]}" --dataset MNIST --epochs 100 --use_random_crop false --use_cutout --cutout_size 16
    # published: kmnist/cutout14 0.82 median of 3
    row kmnist/cutout14 "${RP20_DATA[@]}" --dataset KMNIST --epochs 200 --use_cutout --cutout_size 14
}

# --- Fast training (the DAWNBench line): David Page's final ResNet-9 recipe, 94.1% CIFAR-10 test
# accuracy with flip TTA in 10 epochs (26 s on one V100): "How to train your ResNet 8: Bag of
# tricks" (myrtle.ai, 2019); code: myrtle.ai's cifar10-fast, new_dawn.py and the last cell of
# bag_of_tricks.ipynb. Page sums the loss over the batch with lr/512 and weight decay 5e-4*512;
# on main.py's batch-mean loss that is the same SGD update as lr and weight decay 5e-4.
#   --activation celu --celu_alpha 0.3   CELU(0.3): his 0.075 for BN scales near 1/4, x4 for scales frozen at 1
#   --ghost_bn_splits 16                 ghost BN, statistics per 32 of the 512 images (GhostBatchNorm)
#   --head_scale 0.0625                  logits x 1/16 (1/8 in the 24-epoch network); init: PyTorch default
#   --epochs 10 --batch_size 512         as his; momentum 0.9, Nesterov (the defaults)
#   --base_lr 1.0 --warmup_epochs 2 --warmup_start_factor 0 --scheduler linear --lr_end_factor 0.1
#                                        lr 0 -> 1.0 over epochs 0-2, then linear down to 0.1. DIFFERS: his
#                                        reaches 0.1 at epoch 8 and holds it for the last 2 (EMA) epochs;
#                                        main.py's schedules cannot hold, so here 0.1 comes at epoch 10
#   --weight_decay 5e-4 --bn_weight_freeze --bn_bias_lr_factor 64
#                                        BN scales frozen at 1; BN biases at lr x64, weight decay /64 (his
#                                        5e-4*512/64: not zero, hence no --no_weight_decay_on_bn)
#   --use_label_smoothing --label_smoothing_epsilon 0.2
#   --ema_decay 0.99 --ema_every 5       EMA of weights and BN statistics, 0.99 per step applied every 5 steps
#   --tta flip                           evaluation averages each image and its mirror (of the EMA model)
#   --padding_mode reflect               random 32x32 crop of the reflect-padded (4) image, then flip; no
#                                        Cutout: he dropped his 13-epoch run's 5x5 Cutout to reach 10 epochs
#                                        (use --use_cutout --cutout_inside --cutout_size 5 to restore it:
#                                        his Cutout squares lie inside the image)
# DIFFERS, not reproduced: his prep layer is a fixed 3x3 PCA patch-whitening conv (27 filters from the
# training data) + a 1x1 conv, and his stage1..3 max-pool before BN (conv-pool-BN-CELU); he trains in
# fp16 weights (here bf16 autocast) with per-group augmentation choices. Without them 10 epochs may
# fall short of 94%: his 17-epoch run before whitening reached 94.1% (no EMA or TTA then).
# benchmarks/time_to_accuracy.py --recipe fast_resnet9 runs the same line N times and times it.
FAST_RESNET9=(--arch resnet9 --activation celu --celu_alpha 0.3 --ghost_bn_splits 16 --head_scale 0.0625
              --epochs 10 --batch_size 512 --base_lr 1.0 --warmup_epochs 2 --warmup_start_factor 0
              --scheduler linear --lr_end_factor 0.1 --weight_decay 5e-4 --bn_weight_freeze
              --bn_bias_lr_factor 64 --use_label_smoothing --label_smoothing_epsilon 0.2 --ema_decay 0.99
              --ema_every 5 --tta flip --padding_mode reflect --precision bf16 --channels_last --no-tensorboard)

# airbench94_muon (Jordan, arXiv 2404.00498 and its Muon record) restated for main.py's batch-mean
# loss: airbench sums the loss over the batch of 2000, so its SGD lr 0.053 (biases) and 0.67 (head)
# become x2000 here and its weight decay 0.004/lr becomes /2000 (the same update); Muon's
# orthogonalized step does not depend on the loss scale, so its lr 0.24 stays.
FAST_AIRBENCH94_MUON=(--arch airbench --epochs 8 --batch_size 2000 --test_batch_size 2000 --optimizer muon
              --base_lr 106 --weight_decay 3.7736e-5 --head_lr_factor 12.6415 --momentum 0.85 --nesterov
              --muon_lr 0.24 --muon_momentum 0.6 --muon_ns_steps 3 --scheduler linear --whiten_bias_epochs 3
              --use_label_smoothing --label_smoothing_epsilon 0.2 --alternating_flip --random_crop_padding 2
              --padding_mode reflect --tta flip_translate --precision bf16 --channels_last --compile
              --eval_every 8 --save_every 8 --no-tensorboard)

# airbench94 (arXiv 2404.00498, legacy/airbench94.py: 94.01% in 3.83 s on an A100) restated for the
# batch-mean loss. Its decoupled hyperparameters (lr 11.5 and wd 0.0153 per 1024 examples, momentum
# 0.85, bias_scaler 64) give SGD lr 1.4649e-3 and weight decay 1.3624 on the summed loss of 1024
# images: lr 1.5 and weight decay 1.3304e-3 here; BN biases x64 lr and /64 weight decay. lr from 0.2x
# to 1x over the first 23% of the 476 steps (2.277 epochs), then linear to 0.07x; lookahead every 5
# steps; head = default-initialized linear x 1/9.
# DIFFERS: its whitening bias trains at the full schedule for 3 epochs, then freezes; here its own
# copy of the schedule runs over those 3 epochs (as airbench94_muon does). bf16 autocast, not fp16.
FAST_AIRBENCH94=(--arch airbench --head_scale 0.11111111 --epochs 9.9 --batch_size 1024 --test_batch_size 2000
              --optimizer sgd --base_lr 1.5 --momentum 0.85 --nesterov --weight_decay 1.3304e-3 --bn_bias_lr_factor 64
              --scheduler linear --warmup_epochs 2.277 --warmup_start_factor 0.2 --lr_end_factor 0.07
              --whiten_bias_epochs 3 --lookahead_every 5 --lookahead_decay 0.95 --use_label_smoothing
              --label_smoothing_epsilon 0.2 --alternating_flip --random_crop_padding 2 --padding_mode reflect
              --tta flip_translate --precision bf16 --channels_last --compile --eval_every 10 --save_every 10
              --no-tensorboard)

# Published as test accuracy (94.1%, 94.01%): the error here is 100 minus it. Page and the airbench
# paper give means over runs; only airbench94_muon's count is stated.
fast_training() {
    # published: fast_resnet9 5.9 mean
    row fast_resnet9 "${FAST_RESNET9[@]}"
    # published: fast_airbench94_muon 5.99 mean of 200
    row fast_airbench94_muon "${FAST_AIRBENCH94_MUON[@]}"
    # published: fast_airbench94 5.99 mean
    row fast_airbench94 "${FAST_AIRBENCH94[@]}"
}

# --- Short CPU checks on a CIFAR-10 subset (what results/ reports from this project's machine) ---
# The subset: the first 10,000 training and 2,000 test images of CIFAR-10 in a --dataset_dir of their own
# (results/ used a JPEG copy, unpack_cifar10.py DIR --limit 10000); pass it: -- --dataset_dir DIR.
# Their shipped runs are in results/cpu_*, so those are skipped there: --results DIR runs them anew.
CPU_REG=(--arch resnet_preact --depth 8 --base_channels 16 --epochs 4 --batch_size 128 --scheduler cosine
         --base_lr 0.1 --device cpu --no-tensorboard)
cpu_regularization_check() {
    row cpu_reg/plain "${CPU_REG[@]}"
    row cpu_reg/cutout "${CPU_REG[@]}" --use_cutout --cutout_size 16
    row cpu_reg/random_erasing "${CPU_REG[@]}" --use_random_erasing
    row cpu_reg/mixup "${CPU_REG[@]}" --use_mixup
    row cpu_reg/ricap "${CPU_REG[@]}" --use_ricap
    row cpu_reg/cutmix "${CPU_REG[@]}" --use_cutmix
    row cpu_reg/dual_cutout "${CPU_REG[@]}" --use_dual_cutout
    row cpu_reg/label_smoothing "${CPU_REG[@]}" --use_label_smoothing
    row cpu_reg/autoaugment "${CPU_REG[@]}" --use_autoaugment
}
# Three seeds of three rows: the table summarize.py makes from runs of this machine.
cpu_seeds_check() {
    row cpu_seeds/plain "${CPU_REG[@]}"
    row cpu_seeds/cutout "${CPU_REG[@]}" --use_cutout --cutout_size 16
    row cpu_seeds/label_smoothing "${CPU_REG[@]}" --use_label_smoothing
}
CPU_LB=(--arch resnet_preact --depth 8 --base_channels 8 --epochs 8 --batch_size 1024 --scheduler cosine
        --warmup_epochs 1 --device cpu --no-tensorboard)
cpu_large_batch_check() {
    row cpu_large_batch/sgd_lr0.8 "${CPU_LB[@]}" --optimizer sgd --base_lr 0.8
    row cpu_large_batch/lars_lr0.02 "${CPU_LB[@]}" --optimizer lars --base_lr 0.02 --nesterov false
}

TABLES=(architectures regularization_resnet_preact20_w4 regularization_wrn28_10 regularization_shake_shake
        regularization_resnet_preact20 resnet_preact56_ablation batch_size_lr wrn28_10_ricap_batch512 datasets
        fast_training cpu_regularization_check cpu_seeds_check cpu_large_batch_check)

# ----------------------------------------------------------------------------- the runner

usage() {
    sed -n '2,/^set -euo/p' "$SCRIPT" | sed '$d; s/^# \{0,1\}//'
    echo "Tables: ${TABLES[*]}"
}

die() { echo "run_experiments.sh: $*" >&2; exit 2; }

say() {  # a note: a comment line among --dry's commands, else a line on stderr
    if [[ -n $DRY ]]; then echo "# $*"; else echo "run_experiments.sh: $*" >&2; fi
}

quote() {  # the words as one line a shell reads back as the same words
    local word out=()
    for word in "$@"; do
        if [[ $word =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then
            out+=("$word")
        else
            out+=("'${word//\'/\'\\\'\'}'")
        fi
    done
    echo "${out[*]}"
}

declare -A PUBLISHED_ERROR=() PUBLISHED_RUNS=()
read_published() {
    local line pattern='^[[:space:]]*#[[:space:]]*published:[[:space:]]+([^[:space:]]+)[[:space:]]+([0-9]+(\.[0-9]*)?)[[:space:]]*(.*[^[:space:]])?[[:space:]]*$'
    while IFS= read -r line; do
        if [[ $line =~ $pattern ]]; then
            PUBLISHED_ERROR[${BASH_REMATCH[1]}]=${BASH_REMATCH[2]}
            PUBLISHED_RUNS[${BASH_REMATCH[1]}]=${BASH_REMATCH[4]}
        fi
    done < "$SCRIPT"
}

seeds_of() {  # the seeds of a row: --seeds/SEEDS, else as many as its published median is over
    local runs=${PUBLISHED_RUNS[$1]:-}
    if [[ -n $SEEDS_OPT ]]; then
        echo "$SEEDS_OPT"
    elif [[ $runs =~ ^median\ of\ ([0-9]+) ]]; then
        seq -s ' ' 0 $((BASH_REMATCH[1] - 1))
    elif [[ $runs == "1 run"* ]]; then
        echo 0
    else
        echo "0 1 2"
    fi
}

selected() {  # is row $1 the selected row, or under the selected prefix (all rows when none)?
    [[ -z $SELECT || $1 == "$SELECT" || $1 == "$SELECT"/* ]]
}

scaled_to_epochs() {  # K flags... -> the flags with the row's epoch-valued settings scaled by K / its --epochs
    "$PYTHON" - "$@" <<'PY'
import json, sys
target, flags = float(sys.argv[1]), sys.argv[2:]
epochs = [float(flags[i + 1]) for i, flag in enumerate(flags[:-1]) if flag == '--epochs']
factor = target / epochs[-1] if epochs else 1.0
out = []
for i, flag in enumerate(flags):
    previous = flags[i - 1] if i else ''
    if factor != 1.0 and previous == '--milestones':
        flag = json.dumps([round(m * factor, 4) for m in json.loads(flag)]).replace(' ', '')
    elif factor != 1.0 and previous in ('--warmup_epochs', '--whiten_bias_epochs'):
        flag = f'{round(float(flag) * factor, 4):g}'
    out.append(flag)
sys.stdout.write('\0'.join(out) + ('\0' if out else ''))
PY
}

make_command() {  # seed outdir flags... -> CMD
    local seed=$1 outdir=$2
    shift 2
    if [[ -n $EPOCHS_OPT ]]; then
        # a quick check keeps the row's shape: milestones, warmup and whitening-bias epochs shrink with it
        local -a scaled
        mapfile -d '' -t scaled < <(scaled_to_epochs "$EPOCHS_OPT" "$@")
        set -- "${scaled[@]}"
    fi
    CMD=(./main.py "$@" "${EXTRA_ARGS[@]}")
    if [[ -n $EPOCHS_OPT ]]; then CMD+=(--epochs "$EPOCHS_OPT"); fi
    CMD+=(--seed "$seed" --outdir "$outdir")
}

requested_epochs() {  # the last --epochs of CMD (argparse keeps the last)
    local i epochs=
    for ((i = 0; i < ${#CMD[@]}; i++)); do
        case ${CMD[i]} in
            --epochs) epochs=${CMD[i + 1]:-} ;;
            --epochs=*) epochs=${CMD[i]#--epochs=} ;;
        esac
    done
    echo "$epochs"
}

finished() {  # dir epochs: summary.json there, for that many epochs (a fractional K ends in epoch ceil(K))
    [[ -f $1/summary.json ]] || return 1
    "$PYTHON" -c 'import json, math, sys
done = json.load(open(sys.argv[1])).get("epochs")
sys.exit(0 if sys.argv[2] == "" or done == math.ceil(float(sys.argv[2]) - 1e-9) else 1)' \
        "$1/summary.json" "$2" 2>/dev/null
}

row() {  # NAME FLAGS...: one main.py run per seed into results/NAME/<seed>
    local name=$1
    shift
    selected "$name" || return 0
    MATCHED=$((MATCHED + 1))
    local seeds seed outdir epochs status
    seeds=$(seeds_of "$name")
    case $MODE in
        check) return 0 ;;
        list)
            make_command "${seeds%% *}" "$RESULTS_DIR/$name${EPOCHS_OPT:+_ep$EPOCHS_OPT}/${seeds%% *}" "$@"
            printf '%s\t%s\t%s\t%s\n' "$name" "${PUBLISHED_ERROR[$name]:--}" "${PUBLISHED_RUNS[$name]:--}" \
                "$(quote "${CMD[@]}")"
            return 0 ;;
    esac
    for seed in $seeds; do
        outdir=$RESULTS_DIR/$name${EPOCHS_OPT:+_ep$EPOCHS_OPT}/$seed
        make_command "$seed" "$outdir" "$@"
        epochs=$(requested_epochs)
        if finished "$outdir" "$epochs"; then
            say "skip $outdir: finished (${epochs:-its} epochs)"
            continue
        fi
        if [[ -d $outdir && -n $(ls -A "$outdir") ]]; then
            CMD+=(--resume)
            say "resume $outdir"
        else
            say "start $outdir"
        fi
        if [[ -n $DRY ]]; then
            quote "${CMD[@]}"
            continue
        fi
        "${CMD[@]}" || {
            status=$?
            say "failed with exit status $status: $(quote "${CMD[@]}")"
            exit "$status"
        }
    done
}

norun() {  # NAME REASON: a published figure without a main.py command
    selected "$1" || return 0
    MATCHED=$((MATCHED + 1))
    case $MODE in
        check) ;;
        list) printf '%s\t%s\t%s\t%s\n' "$1" "${PUBLISHED_ERROR[$1]:--}" "${PUBLISHED_RUNS[$1]:--}" "(not run: $2)" ;;
        *) say "skip $1: $2" ;;
    esac
}

for_name() {  # NAME: call the table NAME, or every table with SELECT=NAME (a row or a prefix)
    local table
    MATCHED=0
    if [[ " ${TABLES[*]} " == *" $1 "* ]]; then
        SELECT=
        "$1"
    else
        SELECT=$1
        for table in "${TABLES[@]}"; do "$table"; done
    fi
}

MODE=run
DRY=${DRY:-}
[[ $DRY != 0 ]] || DRY=
SEEDS_OPT=${SEEDS:-}
EPOCHS_OPT=
RESULTS_DIR=${RESULTS_DIR:-results}
PYTHON=${PYTHON:-$(command -v python || command -v python3 || echo python)}
read -r -a EXTRA_ARGS <<< "${EXTRA:-}"
NAMES=()
while (($#)); do
    case $1 in
        --list | list) MODE=list ;;
        --dry) DRY=1 ;;
        --seeds | --epochs | --results)
            (($# >= 2)) || die "$1 needs a value"
            case $1 in
                --seeds) SEEDS_OPT=$2 ;;
                --epochs) EPOCHS_OPT=$2 ;;
                --results) RESULTS_DIR=$2 ;;
            esac
            shift ;;
        --seeds=*) SEEDS_OPT=${1#*=} ;;
        --epochs=*) EPOCHS_OPT=${1#*=} ;;
        --results=*) RESULTS_DIR=${1#*=} ;;
        -h | --help) usage; exit 0 ;;
        --) shift; EXTRA_ARGS+=("$@"); break ;;
        -*) die "unknown option $1 (--help)" ;;
        *) NAMES+=("$1") ;;
    esac
    shift
done
SEEDS_OPT=${SEEDS_OPT//,/ }
[[ $SEEDS_OPT =~ ^[[:space:]]*([0-9]+[[:space:]]*)*$ ]] || die "--seeds $SEEDS_OPT: expected integers like 0,1,2"
[[ -z $EPOCHS_OPT || $EPOCHS_OPT =~ ^[0-9]*\.?[0-9]+$ ]] || die "--epochs $EPOCHS_OPT: expected a number of epochs"
read_published

if ((${#NAMES[@]} == 0)); then
    if [[ $MODE == list ]]; then NAMES=("${TABLES[@]}"); else usage; exit 0; fi
fi
ACTION=$MODE
MODE=check
for name in "${NAMES[@]}"; do
    for_name "$name"
    ((MATCHED > 0)) || die "unknown experiment '$name' (./run_experiments.sh --list)"
done
MODE=$ACTION
for name in "${NAMES[@]}"; do
    for_name "$name"
done
