#!/usr/bin/env bash
# The studies of the README's Results, exactly as they were run (on one H200 each).
#
#   bash docs/results/run_studies.sh DATA STORES OUT [classic] [batch-size] [groups] [l1] [batch-2-128]
#
# DATA holds MNIST in torchvision's layout. Where it does not exist, it is made as the real-
# digit split the studies used: train = the first 8,000 digits of the official test set,
# test = its last 2,000 (from tests/data/mnist-t10k, no download). Each study gets its own
# store STORES/<study>/mlflow.db, and its comparison files go to OUT/<study>/. Running a
# study again resumes it.
set -euo pipefail
root=$(dirname "$(realpath "$0")")/../..
data=$(realpath -m "$1") stores=$(realpath -m "$2") out=$(realpath -m "$3")
shift 3
studies=("$@")
[ ${#studies[@]} -gt 0 ] || studies=(classic batch-size groups l1 batch-2-128)
for study in "${studies[@]}"; do
  case $study in classic|batch-size|groups|l1|batch-2-128) ;;
    *) echo "unknown study $study; choose from classic, batch-size, groups, l1, batch-2-128" >&2; exit 2 ;; esac
done
if [ ! -e "$data/MNIST/raw/train-images-idx3-ubyte" ]; then  # absent, or left empty by a failed download
  python -c "import sys; from pathlib import Path; sys.path.insert(0, '$root'); from benchmarks.speed import prepare_mnist
prepare_mnist(Path('$data'), Path('$root/tests/data/mnist-t10k'), Path('$data'), 8000, None, holdout=2000)"
  echo "made $data: train = the first 8,000 digits of the official MNIST test set, test = its last 2,000"
fi
for study in "${studies[@]}"; do
  mkdir -p "$stores/$study" "$out/$study"
  cd "$stores/$study"  # the store's artifacts (./mlruns) go beside it
  export MLFLOW_TRACKING_URI="sqlite:///$stores/$study/mlflow.db"
  common=(--data-dir "$data" --experiment "$study" --out "$out/$study")
  case $study in
    # 1. BN + L1 (1e-5), LN, GN (2 groups), 20 epochs, 10 seeds
    classic) normlab sweep --seeds 10 "${common[@]}" ;;
    # 2. BN, BN + L1, GN, LN at batch 2..128, 5 seeds, lr = 0.05 x batch / 128 (linear rule)
    batch-size) normlab sweep --norms bn,ln,gn --l1 0,1e-5 --batch-sizes 2,4,8,16,32,64,128 --seeds 5 \
                  --lr-scaling linear "${common[@]}" ;;
    # 3. GN with 1 (= LN), 2, 5 and 10 groups (one channel per group in the 10-channel layers), 5 seeds
    groups) normlab sweep --norms gn --groups 1,2,5,10 --seeds 5 "${common[@]}" ;;
    # 4. BN with L1 = 0, 1e-5, 1e-4, 1e-3, 5 seeds
    l1) normlab sweep --norms bn --l1 0,1e-5,1e-4,1e-3 --seeds 5 "${common[@]}" ;;
    # 5. BN and GN at batch 2 and 128 with 10 seeds, lr = 0.05 x batch / 128: the batch-size
    #    study's open question (does BN lose accuracy at batch 2 against its own batch 128?)
    batch-2-128) normlab sweep --norms bn,gn --l1 0 --batch-sizes 2,128 --seeds 10 --lr-scaling linear \
                   "${common[@]}" ;;
  esac
done
