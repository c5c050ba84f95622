"""Evaluate a finished run's policies on the environment's standard protocol (SPEC Sec. 6).

    python evaluate.py --run-dir runs/small                      # 20 episodes each: trained, BC, random, uniform
    python evaluate.py --run-dir runs/small --policies trained --episodes 5 --render human
    python evaluate.py --run-dir runs/recipe --checkpoint agent_best.pt     # online rounds: the best-collecting one

Every policy plays the same seeded episodes (seeds disjoint from the training data's), each under the env's own
time limit with every reward counted, CarRacing's zoom-in steps included. Prints each policy's mean return with its
standard error and the paired difference (same tracks) between the trained policy and each baseline, and appends
them to the run's metrics.jsonl as one line with "stage": "evaluate". Policies: trained (imagination-trained),
bc (its behaviour-cloned prior), random (the random explorer that collected the data), uniform (uniform over the
action bins each step).
"""
import argparse
import dataclasses
from pathlib import Path

import dreamer4 as d4

POLICIES = {"trained": "eval", "bc": "bc", "random": "random", "uniform": "uniform"}   # flag name -> metrics key


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default="runs/carracing", help="a run with tokenizer.pt and agent.pt")
    parser.add_argument("--checkpoint", default="agent.pt",
                        help="the agent checkpoint in --run-dir: agent.pt (the last round's policy, default) or "
                             "agent_best.pt (online rounds: the round whose collected episodes scored best)")
    parser.add_argument("--episodes", type=int, default=20, help="seeded episodes per policy (default 20)")
    parser.add_argument("--policies", default="trained,bc,random,uniform",
                        help="comma-separated, of trained, bc, random, uniform (default all four)")
    parser.add_argument("--greedy", action="store_true",
                        help="the trained and BC policies take their most likely action instead of sampling")
    parser.add_argument("--video", action="store_true",
                        help="write videos/evaluate_<policy>.mp4 of each policy's first episode")
    parser.add_argument("--render", choices=["human"], default=None, help="human: watch the episodes in a window")
    parser.add_argument("--seed", type=int, default=None,
                        help=f"episode seeds are seed + {d4.EVAL_SEED}, ... (default: the run's seed, as in training)")
    parser.add_argument("--max-episode-steps", type=int, default=0,
                        help="time limit in env steps; 0 keeps the env's own, the standard protocol (default 0)")
    parser.add_argument("--branches", type=int, default=16,
                        help="real states for the branch test (does imagination rank macro actions as reality does?"
                             "); 0 skips it (default 16)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default auto")
    args = parser.parse_args(argv)
    names = [name for name in args.policies.split(",") if name]
    unknown = [name for name in names if name not in POLICIES]
    if unknown or not names:
        raise d4.ConfigError(f"--policies takes trained, bc, random and/or uniform, comma-separated, not "
                             f"'{args.policies}'")
    if args.episodes < 1 or args.max_episode_steps < 0 or args.branches < 0:
        raise d4.ConfigError("--episodes must be >= 1, --max-episode-steps and --branches >= 0")
    return args, names


def main():
    args, names = parse_args()
    run_dir = Path(args.run_dir)
    device = d4.pick_device(args.device)
    path = run_dir / args.checkpoint
    state = d4.load_checkpoint(path, "run train_policy.py on this --run-dir first" +
                               (" with --iterations" if args.checkpoint != "agent.pt" else ""))
    if d4.checkpoint_kind(state) != "agent.pt":
        raise d4.ConfigError(f"{path} holds no agent checkpoint; pass agent.pt or agent_best.pt")
    tokenizer, _, _ = d4.load_tokenizer(run_dir, device)
    cfg = dataclasses.replace(d4.Config(**state["config"]), run_dir=str(run_dir), wandb="disabled",
                              eval_max_episode_steps=args.max_episode_steps)
    bins = d4.env_action_bins(cfg)
    agent = d4.Agent(cfg, bins.bins).to(device).eval()
    d4.load_weights(agent, state["model"], path)
    seed = (cfg.seed if args.seed is None else args.seed) + d4.EVAL_SEED
    policies = d4.evaluation_policies([POLICIES[name] for name in names], agent, tokenizer, bins, cfg, device, seed,
                                      args.greedy)
    returns, first = d4.evaluate_policies(cfg, policies, args.episodes, seed, args.render)
    summary = d4.evaluation_summary(returns)
    if args.branches:
        summary.update(d4.branch_test(agent, tokenizer, bins, cfg, device, args.branches, seed=seed))
    logger = d4.Logger(cfg, "evaluate")
    for name in names:
        key = POLICIES[name]
        line = f"{name:>8}: return {summary[f'{key}_return']:8.1f} +- {summary[f'{key}_return_se']:.1f}"
        if key != "eval" and "eval" in returns:
            line += (f"   trained minus {name}: {summary[f'trained_minus_{key}']:+.1f} +- "
                     f"{summary[f'trained_minus_{key}_se']:.1f} (paired)")
        print(line)
        if args.video:
            print(f"          {logger.video(0, [first[key]], name=f'evaluate_{name}')}")
    if summary.get("branch_pairs"):
        print(f"branch test: imagination orders {summary['branch_agreement']:.2f} of {summary['branch_pairs']} pairs "
              "of macro actions as reality does (chance 0.5)")
    print(f"{args.episodes} episodes per policy, seeds {seed}..{seed + args.episodes - 1}, standard errors; "
          f"appended to {logger.path}")
    logger.log(state["progress"]["step"], checkpoint=args.checkpoint, policies=names, greedy=args.greedy, seed=seed,
               **summary)
    logger.close()


if __name__ == "__main__":
    d4.run_cli(main)
