"""The standard evaluation protocol (SPEC Sec. 6) and the instruments that measure learning, used by
train_policy.py after every round; run as a script, it evaluates a finished run's policies.

    python evaluate.py --run-dir runs/small                      # 20 episodes each: trained, BC, random, uniform
    python evaluate.py --run-dir runs/small --policies trained --episodes 5 --render human
    python evaluate.py --run-dir runs/recipe --checkpoint agent_best.pt     # online rounds: the kept one

Every policy plays the same seeded episodes (seeds disjoint from the training data's), each under the env's own
time limit with every reward counted, CarRacing's zoom-in steps included. Prints each policy's mean return with its
standard error and the paired difference (same tracks) between the trained policy and each baseline, and appends
them to the run's metrics.jsonl as one line with "stage": "evaluate". Policies: trained (imagination-trained),
bc (its behaviour-cloned prior), random (the random explorer that collected the data), uniform (uniform over the
action bins each step).
"""
import argparse
import dataclasses
import math
from pathlib import Path

import numpy as np
import torch

import dreamer4 as d4


def evaluate_returns(cfg, policy, episodes, seed):
    """Each agent's return in `episodes` seeded episodes (see d4.play_episodes), shape (episodes, N)."""
    return np.array([[d4.episode_return(stream) for stream in streams]
                     for streams in d4.play_episodes(cfg, policy, episodes, seed)])


EVAL_SEED = 10_000   # evaluation tracks are seeds seed + EVAL_SEED, ...: apart from those of the training data


def evaluation_policies(names, agent, tokenizer, bins, cfg, device, seed, greedy=False):
    """name -> policy: eval (the imagination-trained policy), bc (its frozen behaviour-cloned prior), random (the
    random explorer that collected the data), uniform (uniform over the action bins, drawn anew every step)."""
    make = dict(eval=lambda: d4.AgentPolicy(agent, tokenizer, tokenizer.window, device, seed=seed, greedy=greedy),
                bc=lambda: d4.AgentPolicy(agent, tokenizer, tokenizer.window, device, True, seed, greedy=greedy),
                random=lambda: d4.random_explorer(bins, cfg, seed),
                uniform=lambda: d4.RandomExplorer(bins, np.random.default_rng(seed), max_hold=1))
    return {name: make[name]() for name in names}


def evaluation_config(cfg):
    """cfg with the evaluation's time limit: the env's own unless eval_max_episode_steps (quick tests)."""
    return dataclasses.replace(cfg, max_episode_steps=cfg.eval_max_episode_steps)


def evaluate_policies(cfg, policies, episodes, seed, render_mode=None):
    """The standard protocol (SPEC Sec. 6): each policy plays the same `episodes` seeded episodes under the env's
    own time limit (unless cfg.eval_max_episode_steps), every reward counted, the reset no-ops included. Returns
    name -> per-episode returns (episodes,) (a multi-agent env's: the mean over its agents), and name -> the first
    episode's frames (T, H, W, 3) of its first agent."""
    from tqdm import tqdm

    cfg = evaluation_config(cfg)
    returns, first = {}, {}
    with tqdm(total=episodes * len(policies), desc="evaluate", unit="episode", leave=False) as bar:
        for name, policy in policies.items():
            played = []
            for streams in d4.play_episodes(cfg, policy, episodes, seed, 1 if render_mode == "human" else 32,
                                         render_mode):
                played.append(np.mean([d4.episode_return(stream) for stream in streams]))
                first.setdefault(name, np.stack(streams[0]["frames"]))
                bar.update(1)
            returns[name] = np.array(played)
    return returns, first


def macro_actions(bins, env_id):
    """Constant actions for branch_test, name -> action values (dims,): CarRacing's gas, brake, left and right; for a
    Discrete space each action (at most 8); for other Boxes each dimension at either bound, the others at 0."""
    if bins.continuous and "CarRacing" in env_id and bins.dims == 3:
        return dict(gas=[0, 1, 0], brake=[0, 0, 0.8], left=[-1, 0.5, 0], right=[1, 0.5, 0])
    if not bins.continuous:
        return {str(a): [a] for a in range(min(bins.bins[0], 8))}
    return {f"{i}{end}": [bound if j == i else 0.0 for j in range(bins.dims)]
            for i in range(bins.dims) for end, bound in (("-", bins.low[i]), ("+", bins.high[i]))}


def branch_test(agent, tokenizer, bins, cfg, device, contexts=16, prefix=None, horizon=8, seed=0):
    """Does imagination rank actions as reality does? From `contexts` real states of a single-agent env (seeded
    resets, then `prefix` >= imagination_context random-explorer steps, by default imagination_context: later the
    explorer has often left the track, where every action scores the same), each macro action (macro_actions) is held
    for `horizon` steps in the real env (replaying seed and prefix: the env is deterministic) and in imagination
    (from the last imagination_context real frames, the same actions replayed); episodes under the evaluation's
    time limit (evaluation_config). Returns branch_agreement: over the
    pairs of macro actions whose real returns differ by more than 0.1, the fraction whose imagined returns are in
    the same order (chance: 0.5); and branch_pairs, their number."""
    cfg = evaluation_config(cfg)
    macros = np.stack([bins.to_bins(np.asarray(value, np.float64)) for value in macro_actions(bins, cfg.env).values()])
    c, m = cfg.imagination_context, len(macros)
    prefix = prefix or c
    env = d4.make_env(cfg)

    def play(k, actions):   # frames and rewards of a seeded episode under the given bin indices
        obs, _ = env.reset(seed=seed + k)
        frames, rewards = [obs], []
        for action in actions:
            obs, reward, terminated, truncated, _ = env.step(bins.to_env(bins.from_bins(action[None]))[0])
            frames.append(obs), rewards.append(reward)
            if terminated or truncated:
                break
        return frames, rewards

    real, contexts_frames, contexts_actions = [], [], []
    try:
        for k in range(contexts):
            explorer = d4.random_explorer(bins, cfg, seed + k)
            explorer.reset(1)
            plan = [explorer()[0] for _ in range(prefix)]
            frames, _ = play(k, plan)
            if len(frames) < prefix + 1:   # the episode ended during the prefix
                continue
            real.append([sum(play(k, plan + [macro] * horizon)[1][prefix:]) for macro in macros])
            contexts_frames.append(np.stack(frames[-c:]))
            contexts_actions.append(np.stack(plan[-c:]))   # frame t of the context was led to by plan[t - 1]
    finally:
        env.close()
    n = len(real)
    if n == 0:
        return dict(branch_agreement=None, branch_pairs=0)
    with torch.no_grad(), d4.autocast(device):
        latents = d4.causal_windows(tokenizer.encode, d4.frames_to_tensor(np.stack(contexts_frames), device),
                                 tokenizer.window).float()
    replay = torch.from_numpy(macros)[:, None].expand(m, horizon, -1).repeat(n, 1, 1).to(device)   # (n M, H, dims)
    rollout = agent.imagine(latents.repeat_interleave(m, 0),
                            torch.from_numpy(np.stack(contexts_actions)).to(device).repeat_interleave(m, 0),
                            horizon, cfg.sampling_steps, torch.Generator(device).manual_seed(seed), replay=replay)
    agreement, pairs = rank_agreement(np.array(real), rollout["rewards"].sum(1).view(n, m).cpu().numpy())
    return dict(branch_agreement=agreement, branch_pairs=pairs)


def rank_agreement(real, imagined, tolerance=0.1):
    """real and imagined returns (contexts, actions) -> the fraction of the pairs of actions of a context whose real
    returns differ by more than `tolerance` that the imagined ones order the same way (None without such pairs),
    and the number of those pairs."""
    i, j = np.triu_indices(real.shape[1], 1)
    differ = np.abs(real[:, i] - real[:, j]) > tolerance
    same = np.sign(real[:, i] - real[:, j]) == np.sign(imagined[:, i] - imagined[:, j])
    return (float(same[differ].mean()) if differ.any() else None), int(differ.sum())


def mean_and_se(values):
    """Mean and its standard error (sample std / sqrt(n); 0 for one value) of a 1-D array."""
    values = np.asarray(values, np.float64)
    se = values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return float(values.mean()), float(se)


def beats_by_two_se(mean, se, other, other_se):
    """Whether a mean exceeds another, measured on other episodes, by more than two standard errors of the
    (unpaired) difference: the standard for "a result" in docs/results.md."""
    return mean - other > 2 * math.sqrt(se ** 2 + other_se ** 2)


def replaces_kept(kept, mean, se, last):
    """Online keep-best (train_policy.py): whether a round whose collected episodes scored mean +- se replaces the
    kept round `kept` (None, or a dict with collect_return and collect_return_se). While rounds run the better
    mean wins; the `last` round wins unless the kept round beat it by more than two standard errors. A kept round
    logged without its standard error (4e7f176 to 36a624d) is given the last round's."""
    if kept is None:
        return True
    if not last:
        return mean > kept["collect_return"]
    return not beats_by_two_se(kept["collect_return"], kept.get("collect_return_se", se), mean, se)


def evaluation_summary(returns):
    """returns: policy name -> per-episode returns (episodes,) on the same seeds, "eval" the trained policy. ->
    {"episodes", "<name>_return", "<name>_return_se", "<name>_returns"} (the last the per-episode returns, so that
    two runs' evaluations on the same tracks can be paired later) and, paired on the same tracks,
    "trained_minus_<name>" with "trained_minus_<name>_se" (mean and standard error of the per-episode differences)
    for every other name."""
    summary = {"episodes": len(next(iter(returns.values())))}
    for name, values in returns.items():
        summary[f"{name}_return"], summary[f"{name}_return_se"] = mean_and_se(values)
        summary[f"{name}_returns"] = [round(float(v), 3) for v in values]
    for name, values in returns.items():
        if "eval" in returns and name != "eval":
            difference = np.asarray(returns["eval"]) - np.asarray(values)
            summary[f"trained_minus_{name}"], summary[f"trained_minus_{name}_se"] = mean_and_se(difference)
    return summary


def action_baseline_nll(train_actions, bins, targets, previous):
    """Two baselines for the BC prior's negative log-likelihood (Agent.prior_nll), in nats summed over action
    dimensions, per target: the data's marginal per dimension (bin frequencies of the training rows, add-one
    smoothed), and "repeat the previous action", p(a) = r [a = a_prev] + (1 - r) marginal(a) with r the fraction of
    training steps that repeat it. train_actions (N, dims) bin indices in episode order, -1 at episode starts;
    targets and previous (..., dims) -> (marginal, repeat) NLLs (...)."""
    train_actions = np.asarray(train_actions)
    log_marginal, repeat = [], []
    for i, n in enumerate(bins):
        present = train_actions[:, i][train_actions[:, i] >= 0]
        log_marginal.append(torch.from_numpy(np.log((np.bincount(present, minlength=n) + 1) / (len(present) + n))))
        pairs = (train_actions[1:, i] >= 0) & (train_actions[:-1, i] >= 0)
        repeat.append(float((train_actions[1:, i] == train_actions[:-1, i])[pairs].mean()))
    marginal_nll, repeat_nll = 0.0, 0.0
    for i, (log_p, r) in enumerate(zip(log_marginal, repeat)):
        target = targets[..., i].clamp_min(0).cpu()
        p = log_p.float()[target].exp()
        marginal_nll = marginal_nll - p.log()
        repeat_nll = repeat_nll - (r * (target == previous[..., i].cpu()).float() + (1 - r) * p).log()
    return marginal_nll, repeat_nll


def prior_quality(agent, dataset, latents, action_bins, bins, cfg, device):
    """The BC prior's next-action NLL on held-out windows (Agent.prior_nll) against the data's marginal and
    "repeat the previous action" (action_baseline_nll, fitted on the training episodes): prior_nll, marginal_nll,
    repeat_nll in nats, over the steps where a previous action exists."""
    index = dataset.sample_index(cfg.eval_sequences, cfg.dyn_seq_len, "eval", np.random.default_rng(cfg.seed))
    held_out = d4.latent_batch(dataset, latents, action_bins, index, device)
    nll, targets, previous = agent.prior_nll(held_out["latents"], held_out["actions"])
    train = np.concatenate([np.arange(start, start + n) for start, n, split in
                            zip(dataset.starts, dataset.lengths, dataset.split) if split == "train"])
    marginal, repeat = action_baseline_nll(action_bins[train], bins.bins, targets, previous)
    valid = ((targets >= 0) & (previous >= 0)).all(-1).cpu()
    return {name: value.cpu()[valid].mean().item() for name, value in
            (("prior_nll", nll), ("marginal_nll", marginal), ("repeat_nll", repeat))}


def correlation(x, y):
    """Pearson correlation of two 1-D tensors (0 where either is constant)."""
    x, y = x.float() - x.float().mean(), y.float() - y.float().mean()
    return ((x * y).sum() / (x.norm() * y.norm()).clamp_min(1e-8)).item()


def reward_calibration(agent, dataset, latents, action_bins, cfg, device):
    """The reward head against real rewards on held-out windows: per frame, read from the real frames
    (reward_real_bias: mean predicted minus real; reward_real_corr: their correlation), and summed over
    eval_horizon frames dreamed from imagination_context real ones with the real actions replayed
    (reward_replay_bias, reward_replay_corr across windows)."""
    c, h = cfg.imagination_context, cfg.eval_horizon
    index = dataset.sample_index(cfg.eval_sequences, c + h, "eval", np.random.default_rng(cfg.seed + 1))
    batch = d4.latent_batch(dataset, latents, action_bins, index, device)
    with torch.no_grad():
        predicted = agent.heads.predicted_reward(agent.features(batch["latents"], batch["actions"]))
        replayed = agent.imagine(batch["latents"][:, :c], batch["actions"][:, :c], h, cfg.sampling_steps,
                                 torch.Generator(device).manual_seed(cfg.seed), replay=batch["actions"][:, c:])
    real, dreamed = batch["rewards"][:, c:].sum(1), replayed["rewards"].sum(1)
    return dict(reward_real_bias=(predicted - batch["rewards"]).mean().item(),
                reward_real_corr=correlation(predicted.flatten(), batch["rewards"].flatten()),
                reward_replay_bias=(dreamed - real).mean().item(), reward_replay_corr=correlation(dreamed, real))


POLICIES = {"trained": "eval", "bc": "bc", "random": "random", "uniform": "uniform"}   # flag name -> metrics key


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default="runs/carracing", help="a run with tokenizer.pt and agent.pt")
    parser.add_argument("--checkpoint", default="agent.pt",
                        help="the agent checkpoint in --run-dir: agent.pt (the last round's policy, default) or "
                             "agent_best.pt (online rounds: the kept round, see train_policy.py)")
    parser.add_argument("--episodes", type=int, default=20, help="seeded episodes per policy (default 20)")
    parser.add_argument("--policies", default="trained,bc,random,uniform",
                        help="comma-separated, of trained, bc, random, uniform (default all four)")
    parser.add_argument("--greedy", action="store_true",
                        help="the trained and BC policies take their most likely action instead of sampling")
    parser.add_argument("--video", action="store_true",
                        help="write videos/evaluate_<policy>.mp4 of each policy's first episode")
    parser.add_argument("--render", choices=["human"], default=None, help="human: watch the episodes in a window")
    parser.add_argument("--seed", type=int, default=None,
                        help=f"episode seeds are seed + {EVAL_SEED}, ... (default: the run's seed, as in training)")
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
    seed = (cfg.seed if args.seed is None else args.seed) + EVAL_SEED
    policies = evaluation_policies([POLICIES[name] for name in names], agent, tokenizer, bins, cfg, device, seed,
                                      args.greedy)
    returns, first = evaluate_policies(cfg, policies, args.episodes, seed, args.render)
    summary = evaluation_summary(returns)
    if args.branches:
        summary.update(branch_test(agent, tokenizer, bins, cfg, device, args.branches, seed=seed))
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
