"""Stage 2: train the interactive dynamics with shortcut forcing (Eq. 6-8) on the frozen tokenizer's latents.

    python train_dynamics.py --preset small --run-dir runs/small      # after train_mae.py on the same run

Reads tokenizer.pt and data/ from --run-dir; writes latents_<tokenizer step>.npy (the encoded dataset),
dynamics.pt, metrics.jsonl and videos/dynamics_*.mp4 (truth | dream).
"""
import dataclasses
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import dreamer4 as d4


@torch.no_grad()
def evaluate(dynamics, tokenizer, batch, cfg, device):
    """Open-loop rollouts on held-out windows: C real context frames, then H frames generated from the true
    actions, decoded and scored by PSNR per horizon against the real frames. Measured alike, through the same
    decoder: the last context frame copied forward (its latents repeated), the same model fed actions shuffled
    across the batch, and the tokenizer's reconstruction of the true frames (the ceiling for any dream). Also how
    far the actions move the dreams at all, which PSNR hides under sampling noise: action_effect_h, per horizon the
    mean squared latent difference between the true-action and the shuffled-action dream (same noise). The two
    baselines are decoded on the first call and kept in batch["baselines"]."""
    dynamics.eval()
    c = cfg.eval_context
    latents, actions = batch["latents"], batch["actions"]
    truth = d4.frames_to_tensor(batch["frames"], device)
    shuffled = actions[torch.randperm(len(actions), generator=torch.Generator().manual_seed(0))]

    def decode_after_context(future):   # the decoder is causal in time: after the real context, each frame
        # with at most its training window of frames
        with d4.autocast(device):
            return d4.causal_windows(tokenizer.decode, torch.cat([latents[:, :c], future], dim=1),
                                     tokenizer.window)[:, c:].float()

    def rollout(future_actions):
        return dynamics.generate(latents[:, :c], actions[:, :c], future_actions[:, c:], cfg.sampling_steps,
                                 generator=torch.Generator(device).manual_seed(cfg.seed))

    dreamed, dreamed_shuffled = rollout(actions), rollout(shuffled)
    dreams, dreams_shuffled = decode_after_context(dreamed), decode_after_context(dreamed_shuffled)
    per_horizon = lambda frames: [d4.psnr(frames[:, h:h + 1], truth[:, c + h:c + h + 1]).item()  # noqa: E731
                                  for h in range(frames.shape[1])]
    if "baselines" not in batch:   # they do not change during training: decode them once (half of the decoding)
        copy = decode_after_context(latents[:, c - 1:c].expand_as(latents[:, c:]))
        batch["baselines"] = dict(copy_psnr_h=per_horizon(copy), recon_psnr_h=per_horizon(decode_after_context(
            latents[:, c:])))
    metrics = dict(rollout_psnr_h=per_horizon(dreams), shuffled_psnr_h=per_horizon(dreams_shuffled),
                   **batch["baselines"], action_effect_h=((dreamed - dreamed_shuffled) ** 2).mean((0, 2, 3)).tolist())
    for key in ("rollout", "copy", "shuffled", "recon"):
        metrics[f"{key}_psnr"] = float(np.mean(metrics[f"{key}_psnr_h"]))
    metrics["action_effect"] = float(np.mean(metrics["action_effect_h"]))
    dynamics.train()
    with d4.autocast(device):
        context = d4.causal_windows(tokenizer.decode, latents[:1, :c], tokenizer.window).float()
    columns = [d4.frames_to_uint8(truth[0]), d4.frames_to_uint8(torch.cat([context[0], dreams[0]]))]
    return metrics, columns


def main():
    cfg = d4.parse_config("dynamics", __doc__)
    run_dir = Path(cfg.run_dir)
    checkpoint_path = run_dir / "dynamics.pt"
    device = d4.pick_device(cfg.device)
    tokenizer, tokenizer_cfg, tokenizer_step = d4.load_tokenizer(run_dir, device)
    state = d4.resume_state(cfg, checkpoint_path)
    d4.seed_everything(cfg.seed)
    cfg = dataclasses.replace(cfg, **{name: getattr(tokenizer_cfg, name) for name in (
        "env", "env_kwargs", "image_size", "num_latents", "latent_dim")})
    dataset, latents, bins, action_bins = d4.world_data(cfg, tokenizer, tokenizer_cfg, tokenizer_step, device)

    def sample(batch, length, split, rng):
        return d4.latent_batch(dataset, latents, action_bins, dataset.sample_index(batch, length, split, rng), device)

    dynamics = d4.Dynamics(cfg, bins.bins, ordered=bins.continuous).to(device)
    trainer = d4.Trainer(dynamics, cfg, device, total_steps=cfg.dynamics_steps)
    step, rng, clock = 0, np.random.default_rng(cfg.seed), d4.Stopwatch(state)
    if state:
        step = trainer.restore(state, checkpoint_path)
        d4.restore_random_state(state["random"], rng)

    def save():
        trainer.save(checkpoint_path, step, cfg, action_bins=bins.bins, random=d4.random_state(rng),
                     elapsed_s=clock())

    logger = d4.Logger(cfg, "dynamics")
    eval_batch = sample(cfg.eval_sequences, cfg.eval_context + cfg.eval_horizon, "eval",
                        np.random.default_rng(cfg.seed))
    eval_batch["frames"] = dataset.frames[eval_batch["index"]]   # only evaluation needs the real frames
    loss = d4.compiled(dynamics.loss, cfg, "dynamics")
    bar = tqdm(total=cfg.dynamics_steps, initial=step, desc="dynamics", unit="step")
    with d4.saved_on_exit(save, bar, logger):
        while step < cfg.dynamics_steps:
            batch = sample(cfg.batch_size, cfg.dyn_seq_len, "train", rng)
            bootstrap = step >= cfg.bootstrap_start * cfg.dynamics_steps
            metrics = trainer.step(loss, batch["latents"], batch["actions"], bootstrap)
            step += 1
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.dynamics_steps:
                logger.log(step, **metrics)
                bar.set_postfix(loss=f"{metrics['dynamics']:.4f}")
            if step % cfg.eval_every == 0 or step == cfg.dynamics_steps:
                scores, columns = evaluate(dynamics, tokenizer, eval_batch, cfg, device)
                logger.log(step, **scores, elapsed_s=clock())
                video = logger.video(step, columns)
                bar.write(f"step {step}: rollout PSNR {scores['rollout_psnr']:.2f} dB, copy-last-frame "
                          f"{scores['copy_psnr']:.2f}, shuffled actions {scores['shuffled_psnr']:.2f}; action effect "
                          f"{scores['action_effect']:.3f}; {video}")
            if step % cfg.save_every == 0:
                save()


if __name__ == "__main__":
    d4.run_cli(main)
