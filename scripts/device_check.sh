#!/usr/bin/env bash
# The GPU checks of issue #5 as one prepared run on a lent device machine (H100/H200); about 5 minutes.
#
# The device image has torch and Triton but not polars, so everything here avoids it: the CUDA tests of
# the trainer, the fused kernel and the decoding masks, the default config timed on Beauty (bench_train.py), and encode
# throughput with and without the fused kernel plus train steps/s (bench_speed.py --device cuda), and the
# cost of each phase on a 500k-item synthetic catalogue (bench_scale.py), and the decoding masks' time on the
# GPU (bench_decoding.py).
#
# Here, first (the shared data does not travel; .devdata is ignored, and carried):
#   mkdir -p .devdata && cp ../shared/data/beauty.npy ../shared/data/ml-100k.npy .devdata/
#   grep -qx '/.devdata/' .git/info/exclude || echo /.devdata/ >> .git/info/exclude
# Then, with the device tool:  run(command="bash scripts/device_check.sh", carry=[".devdata"], timeout_s=540)
# Results come back under $OUT: copy them into bench/<gpu>/ here and update bench/<gpu>/README.md.
# The steps run in order of what issue #5 needs first, the two targets' figures before the tests, in case the run
# meets its time limit: each Triton kernel variant compiles once on a fresh machine (tens of seconds).
set -uo pipefail
# The device image has torch and Triton but not semid installed: the checkout itself is the package
export PYTHONUNBUFFERED=1 SEMID_TEST_DATA="$PWD/.devdata" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out="${OUT:-bench/device}"
mkdir -p "$out"
status=0
step() {  # step NAME COMMAND...: run it, log it, remember a failure, go on with the next step
    local name=$1; shift
    echo "== $name: $*"
    local started=$SECONDS
    "$@" 2>&1 | tee "$out/$name.log" || status=1
    echo "== $name: $((SECONDS - started)) s"
}
# The device tool brings back at most 8 files (5 logs, 3 JSON here): the card and versions head the first log.
step train_default bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv && python3 -c \
    \"import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)\" \
    && python3 scripts/bench_train.py --config configs/default.toml --data .devdata/beauty.npy \
    --devices cuda --out $out/train_default_beauty.json"
# train_default has just timed the whole default run: the speed step's train figure needs only steps/s
step speed python3 scripts/bench_speed.py --device cuda --data .devdata/beauty.npy --full-train-steps 1000 \
    --out "$out/speed_cuda.json"
# The ahead-of-time sm_90 compile test is left to CI: it needs no GPU and takes minutes of CPU here.
step cuda_tests python3 -m pytest -q -ra -p no:cacheprovider tests/test_fused.py tests/test_train.py tests/test_device.py \
    tests/test_decoding.py -k "(cuda or kernel or compiled) and not sm90"
# Constrained-decoding masks for 1,024 beams over a million IDs on the GPU, against the dict trie on the host
step decoding python3 scripts/bench_decoding.py --device cuda --items 1000000 --beams 1024
step scale python3 scripts/bench_scale.py --data-dir .devdata --n 500000 --steps 1000 --device cuda \
    --out "$out/scale_cuda_500k.json"
exit $status
