"""Stage 1: collect random-policy episodes (if the run has none) and train the causal tokenizer (Eq. 5).

    python train_mae.py --preset small --run-dir runs/small

Writes to --run-dir: data/ (episodes), tokenizer.pt (checkpoint), metrics.jsonl, videos/mae_*.mp4.
"""
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import dreamer4 as d4


@torch.no_grad()
def evaluate(tokenizer, eval_frames):
    """Held-out PSNR of unmasked reconstructions, and one clip: original | masked input (half the patches) |
    its reconstruction | reconstruction of the whole frame."""
    tokenizer.eval()
    scores = []
    for frames in eval_frames.split(8):
        scores.append(d4.psnr(tokenizer.decode(tokenizer.encode(frames)).float(), frames) * len(frames))
    clip = eval_frames[:1]
    mask = torch.rand(*clip.shape[:2], tokenizer.num_patches, device=clip.device) < 0.5
    masked_input = tokenizer.unpatchify(torch.where(mask[..., None], 0.5, tokenizer.patchify(clip)))
    from_masked = tokenizer.decode(tokenizer.encode(clip, mask))
    from_whole = tokenizer.decode(tokenizer.encode(clip))
    tokenizer.train()
    columns = [d4.frames_to_uint8(x[0]) for x in (clip, masked_input, from_masked, from_whole)]
    return (sum(scores) / len(eval_frames)).item(), columns


def main():
    cfg = d4.parse_config("mae", __doc__)
    run_dir = Path(cfg.run_dir)
    checkpoint_path = run_dir / "tokenizer.pt"
    state = d4.resume_state(cfg, checkpoint_path)
    d4.seed_everything(cfg.seed)
    device = d4.pick_device(cfg.device)
    d4.make_env(cfg).close()   # fails early, in one line, for an unknown env id
    d4.collect_random(cfg, run_dir / "data")
    dataset = d4.EpisodeDataset(run_dir / "data", cfg.holdout_every)
    if dataset.frames.shape[1:] != (cfg.image_size, cfg.image_size, 3):
        raise d4.ConfigError(f"{run_dir / 'data'} holds {dataset.frames.shape[1:]} frames but --image-size is "
                             f"{cfg.image_size}; use the preset the data was collected with or another --run-dir")

    tokenizer = d4.Tokenizer(cfg).to(device)
    trainer = d4.Trainer(tokenizer, cfg, device, total_steps=cfg.mae_steps)
    step, clock = 0, d4.Stopwatch(state)
    rng = np.random.default_rng(cfg.seed)
    if state:
        step = trainer.restore(state, checkpoint_path)
        d4.restore_random_state(state["random"], rng)
    else:
        train_index = dataset.window_starts("train", 1)
        tokenizer.set_pixel_statistics(dataset.frames[train_index[::max(1, len(train_index) // 4000)]])

    def save():
        trainer.save(checkpoint_path, step, cfg, random=d4.random_state(rng), elapsed_s=clock())

    logger = d4.Logger(cfg, "mae")
    eval_batch = dataset.sample(cfg.eval_sequences, cfg.seq_len, "eval", np.random.default_rng(cfg.seed))
    eval_frames = d4.frames_to_tensor(eval_batch["frames"], device)
    loss = d4.compiled(tokenizer.loss, cfg, "mae")
    bar = tqdm(total=cfg.mae_steps, initial=step, desc="tokenizer", unit="step")
    with d4.saved_on_exit(save, bar, logger):
        while step < cfg.mae_steps:
            frames = d4.frames_to_tensor(dataset.sample(cfg.batch_size, cfg.seq_len, "train", rng)["frames"], device)
            metrics = trainer.step(loss, frames)
            step += 1
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.mae_steps:
                logger.log(step, **metrics)
                bar.set_postfix(mse=f"{metrics['mse']:.5f}")
            if step % cfg.eval_every == 0 or step == cfg.mae_steps:
                score, columns = evaluate(tokenizer, eval_frames)
                logger.log(step, psnr=score, elapsed_s=clock())
                video = logger.video(step, columns)
                bar.write(f"step {step}: held-out PSNR {score:.2f} dB, video {video}")
            if step % cfg.save_every == 0:
                save()


if __name__ == "__main__":
    d4.run_cli(main)
