#!/usr/bin/env bash
# Issue 14's GPU figures in one run of at most 8 minutes: sections in priority order, each with
# its own time limit, each writing its output under $OUT as it finishes, so a run cut off early
# still returns what it measured (8 files: the most the device tool brings back).
#
#   OUT=/some/folder bash scripts/gpu_kernels.sh     # from the repository root, on a CUDA machine
#
# The SD section needs diffusers (absent from the lent machines' image: carry its wheel); it is
# skipped without it. Record what comes back in docs/benchmarks.md with the GPU and versions.
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

run() {  # run NAME SECONDS COMMAND...: output to $OUT/NAME.txt, its tail to the console
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most ${limit}s)"
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    echo "exit status $?" >> "$OUT/$name.txt"
    grep -v Warning "$OUT/$name.txt" | tail -n 30
}

{ nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import torch, triton, timm; print('torch', torch.__version__, 'triton', triton.__version__, 'timm', timm.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# 1. ToMe r=16 on ViT-B/16 batch 64 under torch.compile (target 1.4x), eager beside it
run compile 150 python3 scripts/gpu_probe.py compile
# 2. ToMe r=16 eager on ViT-B/L at batch 64 and 256 (targets: ViT-B b64 >= 1.0x, ViT-L b256 >= 2.4x)
run vit 100 python3 scripts/bench_vit.py --device cuda --dtype float16 \
    --models vit_base_patch16_224,vit_large_patch16_224 --batches 64,256 --r 16 --repeats 7 --no-write
# 3. every op against its reference (time, bandwidth, peak memory, difference)
run kernels 90 python3 scripts/bench_kernels.py --device cuda --dtype float16 --repeats 10 --out "$OUT/kernels.json"
# 4. where ViT-B batch 64's time goes
run profile 50 python3 scripts/gpu_probe.py profile
# 5. A-ViT removal and early exit on ViT-B/16 at batch 256, both at a mean depth of 6 blocks of 12
run adaptive 60 python3 scripts/gpu_probe.py adaptive
# 6. ToMe 0.5 on the SD-1.5 UNet at 1024 px, batch 1 (target 1.2x)
if python3 -c "import diffusers" 2> /dev/null; then
    run sd 100 python3 scripts/bench_diffusion.py --device cuda --dtype float16 --workloads large \
        --repeats-large 10 --match "^tome 0\.5$" --no-write
else
    echo "diffusers is not installed: the SD section is skipped" | tee "$OUT/sd.txt"
fi
