#!/bin/sh
# Issue 19's CPU recipe (docs/results.md, "What limits learning"): the small preset's tokenizer and dynamics (5000
# steps) at seed SEED, then two agent stages side by side on copies of its data (agent seeds SEED and SEED + 1, one
# thread each on two cores), 16 online rounds each: collect 10 full-length episodes with the policy, finetune on the
# grown data (half of every batch from the policy's own episodes), refit the BC prior, 400 imagination steps without
# the KL to the prior continuing the previous round's policy, evaluate on the standard protocol (20 tracks). After
# round 8's collection the agent whose collection scored more continues alone, the other stops (run.py
# --agent-seeds, --pick-round): on one world model some agent seeds drive and others never do. --hours 2.9: on a
# slow day the rounds end early, where at the last round's pace the next one and its scoring collection would end
# past 2.9 hours of training (every stage's elapsed_s; collecting the explorer's data and starting the stages lie
# outside it: 0.1 h are left for them); at the usual speed all 16 rounds fit (docs/results.md).
# Usage: sh docs/online_recipe.sh [RUN_DIR] [SEED] (defaults runs/recipe, 0). Resumable: run the same command again
# after an interruption. RUN_DIR/agent_pick.json names the picked RUN_DIR/agent_seed<S>; there agent.pt is the last
# round's policy, agent_best.pt the same unless the best-collecting earlier round beat its collected episodes by two
# standard errors. Then the learning curve and the kept policy on the standard protocol:
#   python plot.py --run-dir runs/recipe/agent_seed0             # (or agent_seed1) writes its curve.png
#   python evaluate.py --run-dir runs/recipe/agent_seed0 --checkpoint agent_best.pt --policies trained
# Up to commit 4a00874 the recipe was one agent stage (the runs below up to "Two more agent seeds"):
#   python run.py --preset small --run-dir RUN --wandb disabled --seed S --resume --iterations 16 --pmpo-beta 0 \
#     --imagination-steps 400
# Until commit 0c2d0b4 the recipe was 10 rounds on 3500-step dynamics (the runs below, before "16 rounds"):
#   python run.py --preset small --run-dir RUN --wandb disabled --seed S --resume --iterations 10 --pmpo-beta 0 \
#     --imagination-steps 400 --dynamics-steps 3500
# Until commit 00ec37b the recipe imagined 1000 steps a round for 8 rounds (--iterations 8 --imagination-steps
# 1000); the runs below up to the side-by-side on the rebuilt seed-0 world model used that, then 400 steps learned
# faster on that world model (docs/results.md). Compact copies of those last runs' evaluations (docs/curves/;
# imagine1000 and imagine1000_onlinebeta are the side-by-side's two arms below):
#   python plot.py --run-dir docs/curves/imagine1000 docs/curves/imagine400 docs/curves/imagine400_finetune1000 \
#     --before-s 1554 --out docs/online_curve_wm3.png
# docs/online_curve.png (the 1000-step recipe): seeds 0 and 1 are agent stages on one small run's tokenizer,
# dynamics and random-explorer data (the README's runs/small, before any online round); the second:
#   mkdir runs/seed1 && cp -r runs/small/data runs/small/tokenizer.pt runs/small/dynamics.pt runs/seed1/
#   python train_policy.py --preset small --run-dir runs/seed1 --wandb disabled --seed 1 --iterations 8 \
#     --pmpo-beta 0 --imagination-steps 1000
# The third curve, every stage at seed 2 (its own world model), with the recipe's flags at the time:
#   python run.py --preset small --run-dir runs/seed2 --wandb disabled --seed 2 --resume --iterations 8 \
#     --pmpo-beta 0 --imagination-steps 1000
# and its four rounds beyond that recipe (run as --iterations 10, then 12):
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
# script's flags at the time (--iterations 8 --imagination-steps 1000, beta 0); both ran at once with
# OMP_NUM_THREADS=1. The 400-step arms ran on copies of that run's round-0 inputs (its first 126 episodes,
# data/complete, tokenizer.pt, dynamics.pt), one thread each, side by side:
#   python train_policy.py --preset small --run-dir runs/seed0_imagine400 --wandb disabled --seed 0 --iterations 16 \
#     --pmpo-beta 0 --imagination-steps 400            # (stopped after round 11; --iterations only sets the stop)
#   python train_policy.py --preset small --run-dir runs/seed0_finetune1000 --wandb disabled --seed 0 \
#     --iterations 16 --pmpo-beta 0 --imagination-steps 400 --finetune-steps 1000     # (stopped after round 5)
# The 400-step arm's second agent seed, on copies of the same round-0 inputs, beside this script at seed 2 (its own
# world model, sh docs/online_recipe.sh runs/recipe_seed2 2), one thread each:
#   python train_policy.py --preset small --run-dir runs/seed0_imagine400_seed1 --wandb disabled --seed 1 \
#     --iterations 10 --pmpo-beta 0 --imagination-steps 400
# World models 3 and 4 (code of bd33ec4, after agent_best.pt came in 4e7f176), side by side, one thread each:
#   OMP_NUM_THREADS=1 sh docs/online_recipe.sh runs/recipe_seed3 3
#   OMP_NUM_THREADS=1 sh docs/online_recipe.sh runs/recipe_seed4 4
# Agent seed 1 on world models 3 and 4 (code of bd33ec4; lost with the machine after round 7), on copies of each
# run's round-0 inputs (its first 126 episodes, data/complete, tokenizer.pt, dynamics.pt), one thread each:
#   python train_policy.py --preset small --run-dir runs/recipe_seed3_agent1 --wandb disabled --seed 1 \
#     --iterations 10 --pmpo-beta 0 --imagination-steps 400        # and the same on runs/recipe_seed4's copy
# The README's figure of the five recipe runs (imagine400 is agent seed 0 above):
#   python plot.py --run-dir docs/curves/imagine400 docs/curves/recipe_wm0_seed1 docs/curves/recipe_wm2 \
#     docs/curves/recipe_wm3 docs/curves/recipe_wm4 --before-s 1554 --out docs/online_curve_recipe.png \
#     --title "the online recipe: five runs, four world models (CarRacing-v3, 20 episodes per point)"
# The small preset's dynamics trained 3500 steps in all the runs above (5000 from issue 19's stop 35).
# 16 rounds: the agent stage on copies of world models 3 and 4 rebuilt at 5000 dynamics steps (each run's data/,
# tokenizer.pt, dynamics.pt; code of f0d3808), side by side, one thread each, agent seed = world-model seed:
#   OMP_NUM_THREADS=1 python train_policy.py --preset small --run-dir runs/wm3_online --wandb disabled --seed 3 \
#     --pmpo-beta 0 --imagination-steps 400 --iterations 16       # and the same for world model 4 at seed 4
# The recipe alone at seed 0 (code of 0c2d0b4), timed, then extended by four rounds:
#   /usr/bin/time -v sh docs/online_recipe.sh runs/recipe16_seed0 0
#   python train_policy.py --preset small --run-dir runs/recipe16_seed0 --wandb disabled --seed 0 --iterations 20 \
#     --pmpo-beta 0 --imagination-steps 400 --resume
# The recipe alone at seed 1 (code of e364018), timed:
#   /usr/bin/time -v sh docs/online_recipe.sh runs/recipe16_seed1 1
# The README's GIF: world model 1's round-16 policy at agent seed 3 (runs/wm1_agent3 below) on track 10003 (+703.1;
# the round's own evaluation drew +676.1 there), the video's first 150 frames at 60 ms:
#   OMP_NUM_THREADS=1 python evaluate.py --run-dir runs/wm1_agent3 --policies trained --episodes 1 --video \
#     --branches 0
#   python -c "import imageio.v2 as i; i.mimsave('docs/policy.gif', [f for f in i.get_reader( \
#     'runs/wm1_agent3/videos/evaluate_trained_0000000.mp4')][:150], duration=60, loop=0)"
# Until then it was world model 3's round-16 policy on the same track (+313.1), the same two commands on
# runs/wm3_online without OMP_NUM_THREADS.
# Agent seeds across world models (code of e364018), alone, each on copies of a run's round-0 inputs (its first 126
# episodes, data/complete, tokenizer.pt, dynamics.pt): agent seed 3 on runs/recipe16_seed1's (world model 1), then
# agent seed 4 on runs/recipe16_seed0's (world model 0):
#   python train_policy.py --preset small --run-dir runs/wm1_agent3 --wandb disabled --seed 3 --iterations 16 \
#     --pmpo-beta 0 --imagination-steps 400      # and runs/wm0_agent4 with --seed 4 (stopped after round 9)
#   OMP_NUM_THREADS=1 python evaluate.py --run-dir runs/wm1_agent3 --seed 93 --episodes 30 --policies trained,random \
#     --branches 0                                 # 30 fresh tracks, 10093-10122
# Compact copies of the 16-round runs' evaluations (docs/curves/online16_*; online16_wm1_agent3 takes world model
# 1's tokenizer and dynamics rows from online16_wm1_alone, online16_wm0_agent4 world model 0's from
# online16_wm0_alone) and the README's figure:
#   python plot.py --run-dir docs/curves/online16_wm0_alone docs/curves/online16_wm0_agent4 \
#     docs/curves/online16_wm1_alone docs/curves/online16_wm1_agent3 docs/curves/online16_wm3 \
#     docs/curves/online16_wm4 docs/curves/recipe_wm5_agent6 --out docs/online_curve_16.png \
#     --title "the recipe: 16 rounds, seven runs on five world models (CarRacing-v3, 20 episodes per point)"
# (recipe_wm5_agent6, this script end to end on world model 5, below, joined the figure after commit 968c580.)
# Two more agent seeds on world model 1's round-0 inputs (code of bb1fd4e), side by side, one thread each, stopped
# (kill -9, the checkpoint of step 7200) right after each logged round 8's collection:
#   OMP_NUM_THREADS=1 python train_policy.py --preset small --run-dir runs/wm1_agent5 --wandb disabled --seed 5 \
#     --pmpo-beta 0 --imagination-steps 400 --iterations 16       # and runs/wm1_agent6 with --seed 6
# then handed to the recipe's pick (code of 824e302) in a run directory holding world model 1 (its data/ of 126
# explorer episodes, tokenizer.pt, dynamics.pt) with the two as agent_seed5 and agent_seed6 (symlinks):
#   python run.py --preset small --run-dir runs/wm1_pick --wandb disabled --seed 5 --resume --iterations 16 \
#     --pmpo-beta 0 --imagination-steps 400 --agent-seeds 2 --pick-round 8
# Compact copies (docs/curves/online16_wm1_agent5 and _agent6, world model 1's rows from online16_wm1_alone) and
# docs/results.md's figure of world model 1's four agent seeds (online16_wm1_alone is seed 1):
#   python plot.py --run-dir docs/curves/online16_wm1_alone docs/curves/online16_wm1_agent3 \
#     docs/curves/online16_wm1_agent5 docs/curves/online16_wm1_agent6 --out docs/online_curve_wm1.png \
#     --title "world model 1, agent seeds 1, 3, 5 and 6 (CarRacing-v3, 20 episodes per point)"
# This script end to end on world model 5 (code of 41f925f), alone, resumed once with the same command after the
# session ended in round 11:
#   /usr/bin/time -v sh docs/online_recipe.sh runs/recipe_seed5 5
#   python evaluate.py --run-dir runs/recipe_seed5/agent_seed6 --checkpoint agent_best.pt --seed 93 --episodes 30 \
#     --policies trained,random --branches 0       # 30 fresh tracks, 10093-10122
# Compact copies (docs/curves/recipe_wm5_agent5 and _agent6) and docs/results.md's figure:
#   python plot.py --run-dir docs/curves/recipe_wm5_agent5 docs/curves/recipe_wm5_agent6 \
#     --out docs/online_curve_wm5.png \
#     --title "world model 5, the recipe end to end: agent seeds 5 and 6, seed 6 picked after round 8 (CarRacing-v3, 20 episodes per point)"
# This script end to end on world model 7 with --hours 2.9 (code of 847b67f, 7978570 and 222fb12; stopped with
# Ctrl-C three times for the test suite and resumed with the same command; the limit ended it after round 11):
#   /usr/bin/time -v sh docs/online_recipe.sh runs/recipe_seed7 7
#   python evaluate.py --run-dir runs/recipe_seed7/agent_seed7 --checkpoint agent_best.pt --seed 93 --episodes 30 \
#     --policies trained,random --branches 0       # 30 fresh tracks, 10093-10122
# Compact copies: docs/curves/recipe_wm7_agent7 (picked) and docs/curves/recipe_wm7_agent8 (to round 8).
# The seed the pick left, continued alone from a copy of its round-8 checkpoint without the limit (code of 0fe18f3):
#   cp -a runs/recipe_seed7/agent_seed8 runs/wm7_seed8_cont
#   python train_policy.py --preset small --wandb disabled --pmpo-beta 0 --imagination-steps 400 \
#     --run-dir runs/wm7_seed8_cont --seed 8 --iterations 16 --resume
#   python evaluate.py --run-dir runs/wm7_seed8_cont --checkpoint agent_best.pt --seed 93 --episodes 30 \
#     --policies trained,random --branches 0       # 30 fresh tracks, 10093-10122
# Compact copy docs/curves/wm7_agent8_continued, and docs/results.md's figure:
#   python plot.py --run-dir docs/curves/recipe_wm7_agent7 docs/curves/wm7_agent8_continued \
#     --out docs/online_curve_wm7.png \
#     --title "world model 7, --hours 2.9: seed 7 picked after round 8, seed 8 continued afterwards (20 episodes per point)"
set -e
cd "$(dirname "$0")/.."
python run.py --preset small --run-dir "${1:-runs/recipe}" --wandb disabled --seed "${2:-0}" --resume \
  --iterations 16 --pmpo-beta 0 --imagination-steps 400 --agent-seeds 2 --pick-round 8 --hours 2.9
