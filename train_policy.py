"""Stage 3: the agent. Finetunes the world model with policy, reward and continuation heads (Eq. 9), trains the
policy and value heads inside the world model with PMPO (Eq. 10-11), and plays the real environment with them.

    python train_policy.py --preset small --run-dir runs/small      # after train_mae.py and train_dynamics.py

Reads tokenizer.pt, dynamics.pt and data/ from --run-dir; writes agent.pt, metrics.jsonl and videos/
(policy_real_*.mp4: a real episode of the trained policy; policy_imagined_*.mp4: imagined rollouts with their
predicted rewards). The evaluation plays --eval-episodes seeded episodes on the standard protocol (the env's own
time limit, every reward; the same code as evaluate.py) with the imagination-trained policy and, once, on the same
tracks, with the random explorer (the data's policy) and the behaviour-cloned prior; it logs each mean with its
standard error and the paired differences. With --iterations N it then alternates:
collect --iteration-episodes episodes with the policy into data/ (full length, as the evaluation plays them),
finetune on the grown dataset, imagination training, evaluation. In these rounds --online-share of every batch
comes from the policy's own episodes, the BC prior is refit on the grown data, and the imagination-trained policy
carries over from round to round (it starts as the BC prior only once). After the last round one more collection
scores the final policy. agent_best.pt keeps a round's policy, chosen on the collections' tracks, never the
evaluation's: while rounds run, the best-collecting round so far; after the last round, the last policy unless the
best-collecting earlier round beat its collection by more than two standard errors (a closer lead is noise:
docs/results.md). `python evaluate.py --checkpoint agent_best.pt` plays it. Raising --iterations on a finished run
continues from the policy kept then. --hours H ends the rounds early where, at the last round's pace, the next
round and its scoring collection would end past H hours of training (every stage's elapsed_s; the same command
again stops there too, a larger H goes on).
"""
import dataclasses
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import dreamer4 as d4
import evaluate as ev

# the world model's settings come from dynamics.pt, whatever the command line says
WORLD_FIELDS = ("env", "env_kwargs", "image_size", "action_repeat", "zoom_skip", "action_bins", "explore_rest",
                "holdout_every", "num_latents", "latent_dim", "time_every", "dyn_time_every", "mlp_ratio", "softcap",
                "dyn_dim", "dyn_heads", "dyn_kv_heads", "dyn_layers", "latent_tokens", "action_tokens",
                "register_tokens", "max_shortcut_steps", "context_signal", "dyn_seq_len")
COLLECT_SEED = 50_000   # online collection's tracks: apart from the evaluation's (ev.EVAL_SEED) and the random data's


def imagined_video(tokenizer, batch, rollout, device, clips=4):
    """Decoded imagined rollouts (after their real context), upscaled, with each frame's predicted reward."""
    import cv2

    with d4.autocast(device):
        frames = d4.causal_windows(tokenizer.decode, torch.cat([batch["latents"][:clips],
                                   rollout["latents"][:clips]], dim=1), tokenizer.window).float()
    c, columns = batch["latents"].shape[1], []
    for clip, rewards in zip(frames, rollout["rewards"][:clips].tolist()):
        video = d4.frames_to_uint8(clip[c:]).repeat(2, axis=1).repeat(2, axis=2)
        for frame, reward in zip(video, rewards):
            cv2.putText(frame, f"r {reward:+.2f}", (2, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1)
        columns.append(video)
    return columns


def round_end_s(spent_s, round_ends, collect_s):
    """--hours: the training seconds (every stage) at which one more online round and the collection scoring its
    policy would end at the last round's pace: spent_s so far, plus the last round's seconds (round_ends: the agent
    stage's elapsed_s at each round's evaluation; the first round, timed from the stage's start, held no
    collection), plus collect_s (the last collection's seconds). None without round_ends (a run begun before
    --hours kept none)."""
    if not round_ends:
        return None
    return spent_s + round_ends[-1] - (round_ends[-2] if len(round_ends) > 1 else 0.0) + collect_s


def main():
    cfg = d4.parse_config("policy", __doc__)
    if cfg.agent_seeds > 1:
        raise d4.ConfigError("--agent-seeds is run.py's: it starts this stage once per seed and keeps one")
    run_dir = Path(cfg.run_dir)
    checkpoint_path = run_dir / "agent.pt"
    device = d4.pick_device(cfg.device)
    tokenizer, tokenizer_cfg, tokenizer_step = d4.load_tokenizer(run_dir, device)
    dynamics_state = d4.load_checkpoint(run_dir / "dynamics.pt", "run train_dynamics.py on this --run-dir first")
    state = d4.resume_state(cfg, checkpoint_path)
    d4.seed_everything(cfg.seed)
    world = d4.Config(**dynamics_state["config"])
    if (world.num_latents, world.latent_dim) != (tokenizer_cfg.num_latents, tokenizer_cfg.latent_dim):
        raise d4.ConfigError(f"{run_dir / 'dynamics.pt'} was trained on another tokenizer's latents than "
                             f"{run_dir / 'tokenizer.pt'}'s; train the dynamics again on this tokenizer")
    cfg = dataclasses.replace(cfg, **{name: getattr(world, name) for name in WORLD_FIELDS})
    dataset, latents, bins, action_bins = d4.world_data(cfg, tokenizer, tokenizer_cfg, tokenizer_step, device)

    agent = d4.Agent(cfg, bins.bins).to(device)
    agent.dynamics.load_state_dict(dynamics_state["model"])
    finetuner, imaginer = agent.finetune_trainer(cfg, device), agent.imagination_trainer(cfg, device)
    progress = dict(step=0, evaluated=[], collected=0, collect_start=None)   # step counts finetuning + imagination steps
    rng, generator = np.random.default_rng(cfg.seed), torch.Generator(device).manual_seed(cfg.seed)
    if state:
        d4.load_weights(agent, state["model"], checkpoint_path)
        finetuner.load_state_dict(state["finetuner"], checkpoint_path)
        imaginer.load_state_dict(state["imaginer"], checkpoint_path)
        progress = state["progress"]
        d4.restore_random_state(state["random"], rng, generator)
    clock = d4.Stopwatch(progress)
    world_s = (d4.load_checkpoint(run_dir / "tokenizer.pt").get("elapsed_s", 0.0) +   # (a second read: only
               dynamics_state.get("elapsed_s", 0.0)) if cfg.hours else 0.0            # --hours needs it)
    per_iteration = cfg.finetune_steps + cfg.imagination_steps
    total = per_iteration * (cfg.iterations + 1)
    if progress["step"] > total:   # (it would never reach its end)
        raise d4.ConfigError(f"{checkpoint_path} has trained {progress['step']} steps, past the {total} that "
                             f"--iterations {cfg.iterations} with these step counts end at; resume with as many "
                             "iterations and steps as before, or more")

    def save(path=checkpoint_path):
        progress["elapsed_s"] = clock()
        d4.save_checkpoint(path, model=agent.state_dict(), finetuner=finetuner.state_dict(),
                           imaginer=imaginer.state_dict(), progress=progress, config=dataclasses.asdict(cfg),
                           action_bins=bins.bins, random=d4.random_state(rng, generator))

    def sample(batch, length, rng):
        """Training windows; once the policy has played, --online-share of them from its own episodes. Reads
        dataset, latents and action_bins as collect() leaves them."""
        own_from = progress.get("own_from")   # the first episode file the policy played
        own = (round(cfg.online_share * batch) if own_from is not None and
               len(dataset.window_starts("train", length, own_from, required=False)) else 0)
        index = np.concatenate([dataset.sample_index(batch - own, length, "train", rng)] +
                               ([dataset.sample_index(own, length, "train", rng, own_from)] if own else []))
        return d4.latent_batch(dataset, latents, action_bins, index, device)

    def evaluate(iteration, step):
        """The standard protocol; the baselines play once, their returns kept for the paired differences."""
        agent.eval()
        seed = cfg.seed + ev.EVAL_SEED
        names = ["eval"] + ([] if progress.get("baselines") else ["random", "bc"])
        returns, first = ev.evaluate_policies(cfg, ev.evaluation_policies(names, agent, tokenizer, bins, cfg, device,
                                                                          seed), cfg.eval_episodes, seed)
        if "baselines" not in progress:
            progress["baselines"] = {name: returns[name].tolist() for name in ("random", "bc")}
        summary = ev.evaluation_summary({"eval": returns["eval"], **progress["baselines"]})
        if cfg.branch_contexts:
            summary.update(ev.branch_test(agent, tokenizer, bins, cfg, device, cfg.branch_contexts, seed=seed))
        logger.log(step, iteration=iteration, **summary, data_frames=len(dataset.frames),
                   env_steps=len(dataset.frames) * cfg.action_repeat, elapsed_s=clock())
        video = logger.video(step, [first["eval"]], name="policy_real")
        bar.write(f"iteration {iteration}: return over {cfg.eval_episodes} episodes, trained "
                  f"{summary['eval_return']:.1f} +- {summary['eval_return_se']:.1f}, BC prior "
                  f"{summary['bc_return']:.1f} +- {summary['bc_return_se']:.1f}, random explorer "
                  f"{summary['random_return']:.1f} +- {summary['random_return_se']:.1f} (standard errors); {video}")
        agent.train()

    def collect(iteration):
        """Plays episodes with the policy plus exploration into data/, then extends the dataset and latents.
        Resumable: progress counts the episodes already saved."""
        nonlocal dataset, latents, action_bins
        if progress["collect_start"] is None:
            progress.update(collect_start=len(d4.episode_files(run_dir / "data")), collect_played=0,
                            collect_returns=[], collect_began=clock())
            progress.setdefault("own_from", progress["collect_start"])
        agent.eval()
        began = progress.get("collect_began", clock())   # (absent in a collection begun by an older version)
        start, played = progress["collect_start"], progress["collect_played"]
        seed = cfg.seed + COLLECT_SEED + start + played
        explorer = d4.AgentPolicy(agent, tokenizer, tokenizer.window, device, seed=seed,
                                  explorer=d4.random_explorer(bins, cfg, seed), explore_prob=cfg.explore_prob)
        for streams in d4.play_episodes(ev.evaluation_config(cfg), explorer, cfg.iteration_episodes - played, seed):
            files = len(d4.episode_files(run_dir / "data"))
            for i, stream in enumerate(streams):
                d4.save_episode(run_dir / "data" / f"episode_{files + i:06d}.npz", stream)
            progress["collect_played"] += 1
            progress.setdefault("collect_returns", []).append(float(np.mean([d4.episode_return(s) for s in streams])))
            save()
            bar.write(f"iteration {iteration}: collected an episode, return {progress['collect_returns'][-1]:.1f}")
        agent.train()
        if progress.get("collect_returns"):   # (absent in a collection begun by an older version)
            keep_best(iteration - 1, *ev.mean_and_se(progress["collect_returns"]), last=progress["step"] == total)
        progress.update(collect_start=None, collected=iteration)
        dataset, latents, _, action_bins = d4.world_data(cfg, tokenizer, tokenizer_cfg, tokenizer_step, device)
        progress["collect_s"] = clock() - began   # with encoding its frames, for --hours

    def keep_best(played, mean, se, last):
        """The policy of round `played` (its collected episodes scored mean +- se) goes to agent_best.pt if it
        replaces the kept one (ev.replaces_kept; `last`: after the last round)."""
        best = progress.get("best")
        logger.log(progress["step"], iteration=played, collect_return=mean, collect_return_se=se)
        if ev.replaces_kept(best, mean, se, last):
            progress["best"] = dict(iteration=played, collect_return=mean, collect_return_se=se)
            save(run_dir / "agent_best.pt")
            bar.write(f"iteration {played}: its collection return {mean:.1f} +- {se:.1f} is the "
                      f"{'last; no earlier round beat it by 2 SE' if last else 'best so far'}; its policy kept in "
                      f"{run_dir / 'agent_best.pt'}")
        elif last:
            bar.write(f"iteration {played} (the last): collection return {mean:.1f} +- {se:.1f}; iteration "
                      f"{best['iteration']}'s {best['collect_return']:.1f} beat it by more than 2 SE and stays in "
                      f"{run_dir / 'agent_best.pt'}")

    def log_diagnostics(step):   # the finetuned heads on held-out data
        agent.eval()
        scores = ev.prior_quality(agent, dataset, latents, action_bins, bins, cfg, device)
        calibration = ev.reward_calibration(agent, dataset, latents, action_bins, cfg, device)
        logger.log(step, **scores, **calibration)
        bar.write("held-out windows: BC prior next-action NLL (nats) " +
                  ", ".join(f"{name} {value:.3f}" for name, value in scores.items()) + "; reward head " +
                  ", ".join(f"{name} {value:+.3f}" for name, value in calibration.items()))
        agent.train()

    logger = d4.Logger(cfg, "policy")
    bar = tqdm(total=total, initial=progress["step"], desc="agent", unit="step")
    returns = []
    with d4.saved_on_exit(save, bar, logger):
        while True:
            step = progress["step"]
            iteration, within = divmod(step, per_iteration)
            if step > 0 and within == 0 and len(progress["evaluated"]) < iteration:
                evaluate(iteration - 1, step)   # the previous iteration has ended
                progress.setdefault("round_ends", []).append(clock())
                progress["evaluated"].append(step)
                save()
            if 0 < step < total and within == 0 and cfg.hours:
                if progress.get("hours_check", {}).get("step") != step:   # once a round: --resume keeps the decision
                    ends = progress.get("round_ends")
                    done = progress["collected"] >= iteration   # (run.py's pick: the round's data is in)
                    progress["hours_check"] = dict(step=step, end_s=round_end_s(
                        world_s + clock(), ends if ends and len(ends) == iteration else None,
                        0.0 if done else progress.get("collect_s", 0.0)))
                    if progress["hours_check"]["end_s"] is None:
                        bar.write(f"--hours {cfg.hours:g}: this run kept no round times (it began before --hours); "
                                  "its rounds are not limited")
                end_s = progress["hours_check"]["end_s"]
                if end_s is not None and end_s > cfg.hours * 3600:
                    total = bar.total = step   # a larger --hours goes on from here
                    bar.write(f"--hours {cfg.hours:g}: at the last round's pace round {iteration} would end after "
                              f"{end_s / 3600:.2f} h; round {iteration - 1}'s policy is the last")
            if step == total:
                if cfg.iterations and progress["collected"] < iteration:
                    collect(iteration)   # scores the last round's policy for agent_best.pt (its data stays)
                break
            if within == 0 and progress["collected"] < iteration:
                collect(iteration)
            if within < cfg.finetune_steps:
                batch = sample(cfg.batch_size, cfg.dyn_seq_len, rng)
                metrics = finetuner.step(agent.finetune_loss, batch["latents"], batch["actions"], batch["rewards"],
                                         batch["terminated"])
            else:
                if within == cfg.finetune_steps:
                    if iteration == 0:
                        agent.heads.start_policy()   # later rounds carry the policy over
                    log_diagnostics(progress["step"])
                agent.beta = cfg.online_beta if iteration > 0 and cfg.online_beta >= 0 else cfg.pmpo_beta
                batch = sample(cfg.batch_size, cfg.imagination_context, rng)
                rollout = agent.imagine(batch["latents"], batch["actions"], cfg.imagination_horizon,
                                        cfg.sampling_steps, generator)
                metrics = dict(imaginer.step(agent.imagination_loss, rollout), kl_weight=agent.beta)
                returns.append(rollout["rewards"].sum(1).mean().item())
            progress["step"] += 1
            bar.update(1)
            if progress["step"] % cfg.log_every == 0 or progress["step"] == total:
                if returns:
                    metrics["imagined_return"] = float(np.mean(returns))
                    returns = []
                logger.log(progress["step"], phase="finetune" if within < cfg.finetune_steps else "imagine",
                           elapsed_s=clock(), **metrics)   # the gaps between phases: collection and evaluation
                bar.set_postfix({k: f"{metrics[k]:.3f}" for k in ("bc", "reward", "policy", "imagined_return")
                                 if k in metrics})
            last = within == per_iteration - 1   # every iteration's end gets an imagined video
            if within >= cfg.finetune_steps and (progress["step"] % cfg.eval_every == 0 or last):
                logger.video(progress["step"], imagined_video(tokenizer, batch, rollout, device),
                             name="policy_imagined")
            if progress["step"] % cfg.save_every == 0:
                save()


if __name__ == "__main__":
    d4.run_cli(main)
