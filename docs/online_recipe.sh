#!/bin/sh
# Issue 19's CPU recipe (docs/results.md, "What limits learning"; about 2.6 h on a 2-core CPU): the small preset's
# tokenizer and dynamics, then the agent with 8 online rounds: collect 10 full-length episodes with the policy,
# finetune on the grown data (half of every batch from the policy's own episodes), refit the BC prior, 1000
# imagination steps without the KL to the prior continuing the previous round's policy, evaluate on the standard
# protocol. Usage: sh docs/online_recipe.sh [RUN_DIR] [SEED] (defaults runs/recipe, 0). Resumable: run the same
# command again after an interruption. Then the learning curve:
#   python plot.py --run-dir runs/recipe --out docs/online_curve.png
# The README's seeds 0 and 1 are agent stages on one small run's tokenizer, dynamics and random-explorer data (the
# README's runs/small, before any online round); the second:
#   mkdir runs/seed1 && cp -r runs/small/data runs/small/tokenizer.pt runs/small/dynamics.pt runs/seed1/
#   python train_policy.py --preset small --run-dir runs/seed1 --wandb disabled --seed 1 --iterations 8 \
#     --pmpo-beta 0 --imagination-steps 1000
# The third curve, every stage at seed 2 (its own world model): sh docs/online_recipe.sh runs/seed2 2
# and its four rounds beyond the recipe (run as --iterations 10, then 12):
#   python train_policy.py --preset small --run-dir runs/seed2 --wandb disabled --seed 2 --iterations 12 \
#     --pmpo-beta 0 --imagination-steps 1000 --resume
# The seed-2 probe with a small KL to the refit prior from round 1 (docs/results.md) ran the agent stage on copies
# of runs/seed2's round-0 inputs (its first 126 episodes, data/complete, tokenizer.pt, dynamics.pt) in a new
# runs/seed2_onlinebeta:
#   python train_policy.py --preset small --run-dir runs/seed2_onlinebeta --wandb disabled --seed 2 --iterations 8 \
#     --pmpo-beta 0 --imagination-steps 1000 --online-beta 0.03
# The side-by-side on a rebuilt seed-0 world model (docs/results.md): the whole pipeline with the flag,
#   python run.py --preset small --run-dir runs/seed0_onlinebeta --wandb disabled --seed 0 --resume --iterations 8 \
#     --pmpo-beta 0 --imagination-steps 1000 --online-beta 0.03
# copied after round 1's collection (cp -r runs/seed0_onlinebeta runs/seed0_beta0) and continued there with this
# script's flags (sh docs/online_recipe.sh runs/seed0_beta0); both ran at once with OMP_NUM_THREADS=1.
set -e
cd "$(dirname "$0")/.."
python run.py --preset small --run-dir "${1:-runs/recipe}" --wandb disabled --seed "${2:-0}" --resume \
  --iterations 8 --pmpo-beta 0 --imagination-steps 1000
