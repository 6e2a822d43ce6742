#!/usr/bin/env bash
# The demo model (docs/training.md, "The demo model"): a tiny OmniFlatten trained on this
# machine's CPU from synthesised phone dialogues, so that it takes turns: it speaks after
# the caller stops, and stops when the caller speaks over it. Its voice is the stand-in
# tone decoder: callers hear tones, not words.
#
#   data synth -> model init (tokenizer fitted to the audio) -> data prepare -> train -> eval turns
#
# Writes the model folder to $DEMO_OUT (default models/demo/) with its evaluation
# (turns.md, turns.json); data, shards and the run go to $DEMO_WORK (default build/demo/,
# git-ignored). Every step skips what is done (synth and prepare resume; training resumes
# from its last checkpoint); a finished $DEMO_OUT is kept. One torch thread throughout,
# so the machine stays usable. Every setting below can be changed through the environment.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=.venv/bin/python
DL=.venv/bin/duplexline
OUT=${DEMO_OUT:-models/demo}
WORK=${DEMO_WORK:-build/demo}
COUNT=${DEMO_COUNT:-400}            # training dialogues
HELDOUT=${DEMO_HELDOUT:-40}         # held-out dialogues (another seed)
LAYERS=${DEMO_LAYERS:-4}
WIDTH=${DEMO_WIDTH:-128}
CODEBOOK=${DEMO_CODEBOOK:-256}
FIT_ENTRIES=${DEMO_FIT_ENTRIES:-120}
LR=${DEMO_LR:-2e-3}
BATCH=${DEMO_BATCH:-8}
EPOCHS=${DEMO_EPOCHS:-8}
# 0: plain greedy, which this recipe's model passes (100% / 100%); 0.5 ("speak when likelier
# than not", docs/engine.md) is what a less trained model needs to speak at all.
SPEAK_THRESHOLD=${DEMO_SPEAK_THRESHOLD:-0}
# Pauses shorter than gaps: a model that hears no words can learn "answer after this much
# silence" (docs/training.md). No backchannels: a caller's "mhm" would look like a barge-in.
# Twice as many interruptions, cut soon after the caller's onset: stopping is the rarer lesson.
SYNTH=(--backchannel 0 --gap 0.5,0.7 --pause 0.2,0.35 --cut 0.15,0.3 --patterns respond=1,interrupt=2,wait=1 --jobs 2)
export OMP_NUM_THREADS=1

if [ -f "$OUT/config.json" ] && [ -f "$OUT/turns.md" ]; then
    echo "demo-model: $OUT is already there (remove it to rebuild)"
    cat "$OUT/turns.md"
    exit 0
fi
mkdir -p "$WORK"
t0=$(date +%s)
step() { echo "demo-model: [$(( $(date +%s) - t0 )) s] $*"; }

step "synthesising $COUNT training and $HELDOUT held-out dialogues"
$DL data synth --out "$WORK/train" --count "$COUNT" --seed 0 "${SYNTH[@]}"
$DL data synth --out "$WORK/heldout" --count "$HELDOUT" --seed 1000 "${SYNTH[@]}"

if [ ! -f "$WORK/base/config.json" ]; then
    step "a random $LAYERS x $WIDTH backbone, $CODEBOOK speech codes, the tokenizer fitted to $FIT_ENTRIES dialogues"
    rm -rf "$WORK/base"
    $DL model init "$WORK/base" --tiny --layers "$LAYERS" --width "$WIDTH" --codebook "$CODEBOOK" \
        --fit-codebook "$WORK/train/manifest.jsonl" --fit-entries "$FIT_ENTRIES"
fi

step "tokenizing the training dialogues"
$DL data prepare "$WORK/train/manifest.jsonl" --model "$WORK/base" --out "$WORK/shards" --threads 1

if [ ! -f "$WORK/run/model/config.json" ]; then
    resume=()
    if ls "$WORK/run/checkpoints/"*.pt >/dev/null 2>&1; then resume=(--resume); fi
    step "training stage 3 (full duplex): lr $LR, batch $BATCH, $EPOCHS epochs"
    $DL train --stage 3 --model "$WORK/base" --data "$WORK/shards" --out "$WORK/run" \
        --lr "$LR" --batch-size "$BATCH" --epochs "$EPOCHS" --threads 1 --save-every 200 --keep 1 \
        --no-progress "${resume[@]}"
fi

step "writing $OUT (greedy decoding, speak threshold $SPEAK_THRESHOLD)"
rm -rf "$OUT.part"
mkdir -p "$(dirname "$OUT")"
cp -r "$WORK/run/model" "$OUT.part"
$PY - "$OUT.part/config.json" "$SPEAK_THRESHOLD" <<'EOF'
import json, sys
path, threshold = sys.argv[1], float(sys.argv[2])
config = json.load(open(path))
config["sampling"].update(temperature=0.0, speak_threshold=threshold)
json.dump(config, open(path, "w"), indent=2)
EOF

step "evaluating turn-taking on $HELDOUT held-out dialogues"
$DL eval turns --model "$OUT.part" --manifest "$WORK/heldout/manifest.jsonl" --out "$WORK/eval"
cp "$WORK/eval/turns.md" "$WORK/eval/turns.json" "$OUT.part/"
sed -i "s#$OUT.part#$OUT#" "$OUT.part/turns.md" "$OUT.part/turns.json"  # the name it will have
rm -rf "$OUT"
mv "$OUT.part" "$OUT"
step "done: $OUT ($(du -sh "$OUT" | cut -f1)); serve it with: $DL serve --model $OUT"
