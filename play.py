"""Drive inside the trained world model by keyboard, as the paper's human players did: every frame you see is
dreamed by the dynamics and decoded by the tokenizer; your keys are its actions.

    python play.py --run-dir runs/small                   # arrows or WASD: steer, gas, brake; Esc quits
    python play.py --run-dir runs/small --side-by-side    # the real env beside the dream, driven by the same keys
    python play.py --run-dir runs/small --agent           # the trained policy drives the dream

The dream starts from a real context: --context frames of a random held-out episode of the run, or with
--side-by-side the real env's first frames after a seeded reset (the car standing still), so that both start on
the same track. Each frame follows Agent.imagine's protocol: the action (keys, or the policy reading the agent
token) and --sampling-steps shortcut steps make the next latents, which join the KV cache as context; the agent's
reward head predicts the reward that arrived with them (shown). Envs with a Discrete action space take the number
keys. Reads tokenizer.pt, agent.pt and data/ from --run-dir and writes nothing there.

For tests and benchmarks, --keys replays a scripted sequence instead of the keyboard: comma-separated frames, each
the keys held in it (w gas, a left, s brake, d right, digits for Discrete actions, . none), `*N` repeating a
frame, e.g. "w*20,wa*8,.*4,s*5". --frames stops after N frames. The last line printed is `frames/s: X`.
"""
import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

import dreamer4 as d4

KEYS = set("wasd0123456789.")


def parse_keys(text):
    """'w*3,wa,.' -> [{'w'}, {'w'}, {'w'}, {'w', 'a'}, set()]: the keys held in each frame."""
    frames = []
    for item in text.split(","):
        keys, _, count = item.strip().partition("*")
        if not keys or not set(keys) <= KEYS or (count and not (count.isdigit() and int(count) > 0)):
            raise d4.ConfigError(f"--keys: cannot read '{item}'; give frames like w, wa, s, 3 or . (none), "
                                 "optionally *N to repeat, separated by commas")
        frames += [set(keys) - {"."}] * int(count or 1)
    return frames


def keyboard_keys(pygame):
    """The keys held now, in --keys letters (arrows count as WASD)."""
    pressed = pygame.key.get_pressed()
    held = {letter for letter, codes in (("w", (pygame.K_w, pygame.K_UP)), ("a", (pygame.K_a, pygame.K_LEFT)),
                                         ("s", (pygame.K_s, pygame.K_DOWN)), ("d", (pygame.K_d, pygame.K_RIGHT)))
            if any(pressed[code] for code in codes)}
    return held | {str(n) for n in range(10) if pressed[getattr(pygame, f"K_{n}")]}


def keys_to_action(keys, bins):
    """Held keys -> bin indices (dims,). A 3-dimensional Box is CarRacing's (steer, gas, brake): a/d steer fully
    left/right, w gives full gas, s brakes at 0.8. A Discrete space takes the highest digit held (none: 0)."""
    if bins.continuous:
        steer = ("d" in keys) - ("a" in keys)
        return bins.to_bins(np.array([steer, 1.0 if "w" in keys else 0.0, 0.8 if "s" in keys else 0.0]))
    digits = [int(k) for k in keys if k.isdigit() and int(k) < bins.bins[0]]
    return np.array([max(digits, default=0)])


def check_action_space(bins, scripted):
    if bins.continuous and bins.dims != 3:
        raise d4.ConfigError(f"play.py maps keys to CarRacing's 3 action dimensions (steer, gas, brake) or to a "
                             f"Discrete space; this run's env has {bins.dims} continuous dimensions")
    if not bins.continuous and bins.dims != 1:
        raise d4.ConfigError(f"play.py maps number keys to one Discrete action; this run's env has {bins.dims}")
    if not bins.continuous and any(k.isdigit() and int(k) >= bins.bins[0] for frame in scripted for k in frame):
        raise d4.ConfigError(f"--keys: this run's env has actions 0..{bins.bins[0] - 1}")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", required=True, help="a run with tokenizer.pt, agent.pt and data/")
    parser.add_argument("--side-by-side", action="store_true",
                        help="run the real env (seeded by --seed) beside the dream with the same actions")
    parser.add_argument("--agent", action="store_true", help="the trained policy drives instead of the keyboard")
    parser.add_argument("--keys", help="scripted key sequence instead of the keyboard, e.g. 'w*20,wa*8,.*4'")
    parser.add_argument("--frames", type=int, default=0, help="stop after this many frames (0: run until Esc, or "
                                                              "the end of --keys or of the real episode)")
    parser.add_argument("--fps", type=float, default=15, help="frame-rate cap in frames/s (0: as fast as it goes)")
    parser.add_argument("--context", type=int, default=0,
                        help="real context frames before the dream (0: the agent's --imagination-context)")
    parser.add_argument("--sampling-steps", type=int, default=0,
                        help="shortcut steps per dreamed frame (K; 0: the run's --sampling-steps)")
    parser.add_argument("--scale", type=int, default=0, help="window pixels per frame pixel (0: about 384 px wide)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the context choice, the noise and the real env")
    parser.add_argument("--video", help="also write the frames shown (real | dream) to this .mp4 or .gif")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the models run")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (one frame's ops are too small to share; see docs/results.md)")
    args = parser.parse_args()
    if args.threads < 1:
        raise d4.ConfigError("--threads must be 1 or more")
    for name in ("frames", "context", "sampling_steps", "scale"):
        if getattr(args, name) < 0:
            raise d4.ConfigError(f"{d4.flag(name)} must be 0 or more")
    if args.agent and args.keys:
        raise d4.ConfigError("--agent drives by itself; leave out --keys")
    return args


def real_context(env, bins, context, seed, multi):
    """The env's first `context` frames after a seeded reset under the no-op action: frames (C, H, W, 3) uint8 and
    the actions that led to them (C, dims) as bin indices, -1 for the first."""
    obs, _ = env.reset(seed=seed)
    frames, noop = [obs[0] if multi else obs], keys_to_action(set(), bins)
    for _ in range(context - 1):
        frames.append(env_step(env, bins, noop, multi)[0])
    return np.stack(frames), np.stack([np.full(bins.dims, -1)] + [noop] * (context - 1))


def held_out_context(dataset, bins, context, window, rng):
    """A random held-out window of `context` frames, with up to window - 1 frames before it in its episode (the
    tokenizer's causal context, as in the latent cache): frames (P + C, H, W, 3) with P such frames, actions
    (C, dims) as bin indices (-1 where no action led to the frame), and P."""
    start = int(rng.choice(dataset.window_starts("eval", context)))
    episode_start = dataset.starts[np.searchsorted(dataset.starts, start, side="right") - 1]
    before = min(window - 1, start - episode_start)
    index = np.arange(start - before, start + context)
    actions = np.where(dataset.first[index, None], -1, bins.to_bins(dataset.actions[index]))
    return dataset.frames[index], actions[before:], before


def env_step(env, bins, action, multi):
    """Steps the real env with bin indices (dims,); returns (frame, reward, episode ended)."""
    value = bins.from_bins(action[None])
    if multi:   # every car gets the same action
        value = np.repeat(value, env.observation_space.shape[0], axis=0).reshape(env.action_space.shape)
    obs, reward, terminated, truncated, _ = env.step(value if multi else bins.to_env(value)[0])
    return obs[0] if multi else obs, float(reward), terminated or truncated


def main():
    args = parse_args()
    scripted = parse_keys(args.keys) if args.keys else None
    run_dir = Path(args.run_dir)
    device = d4.pick_device(args.device)
    torch.set_num_threads(args.threads)
    state = d4.load_checkpoint(run_dir / "agent.pt", "run train_policy.py on this --run-dir first")
    tokenizer, _, _ = d4.load_tokenizer(run_dir, device)
    # the run's settings, but the env's own time limit: the real game, not the short training episodes
    cfg = d4.Config(**{**state["config"], "run_dir": str(run_dir), "max_episode_steps": 0})
    agent = d4.Agent(cfg, state["action_bins"]).to(device).eval().requires_grad_(False)
    d4.load_weights(agent, state["model"], run_dir / "agent.pt")
    env = d4.make_env(cfg)
    multi = len(env.observation_space.shape) == 4
    bins = d4.ActionBins(d4.stream_action_space(env.action_space, env.observation_space), cfg.action_bins)
    check_action_space(bins, scripted or [])
    context = args.context or cfg.imagination_context
    steps = args.sampling_steps or cfg.sampling_steps
    generator = torch.Generator(device).manual_seed(args.seed)

    if args.side_by_side:
        frames, actions = real_context(env, bins, context, args.seed, multi)
        before, real = 0, [frames[-1]]
    else:
        env.close()
        dataset = d4.EpisodeDataset(run_dir / "data", cfg.holdout_every)
        frames, actions, before = held_out_context(dataset, bins, context, tokenizer.window,
                                                   np.random.default_rng(args.seed))
        real = None
    with torch.no_grad(), d4.autocast(device):
        latents = d4.causal_windows(tokenizer.encode, d4.frames_to_tensor(frames[None], device),
                                    tokenizer.window)[:, before:].float()   # (1, C, N, Dl)
    actions = torch.from_numpy(actions).to(device)[None]                         # (1, C, dims)
    noise = lambda n: torch.randn(1, n, *latents.shape[2:], device=device, generator=generator)  # noqa: E731

    # the protocol of Agent.imagine, one frame at a time
    cache = d4.KVCache(agent.window)
    with torch.no_grad(), d4.autocast(device):
        features = agent.dynamics.observe(cache, latents, actions, noise(context), agent=True)[:, -1].float()
        shown = tokenizer.decode(latents[:, -tokenizer.window:])[:, -1]
    recent = list(latents[:, -tokenizer.window:].split(1, dim=1))   # the decoder's causal window, (1, 1, N, Dl) each
    dreams = [d4.frames_to_uint8(shown.float())[0]]

    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    import pygame

    pygame.display.init()
    pygame.font.init()
    side = cfg.image_size * (args.scale or max(1, round(384 / cfg.image_size)))
    panels = 2 if args.side_by_side else 1
    screen = pygame.display.set_mode((side * panels, side + 44))
    pygame.display.set_caption("dreamer4-compact: " + ("the policy drives" if args.agent else "you drive")
                               + " inside the world model")
    font, clock = pygame.font.Font(None, 22), pygame.time.Clock()

    def draw(reward, dreamed_return, real_return, frame):
        screen.fill((0, 0, 0))
        for i, (image, label) in enumerate(([(real[-1], "real")] if real else []) + [(dreams[-1], "dream")]):
            surface = pygame.surfarray.make_surface(np.ascontiguousarray(image.transpose(1, 0, 2)))
            screen.blit(pygame.transform.scale(surface, (side, side)), (i * side, 0))
            screen.blit(font.render(label, True, (255, 255, 0)), (i * side + 4, 4))
        lines = [f"predicted reward {reward:+.2f}, return {dreamed_return:+.1f}",
                 f"frame {frame}" + (f", real return {real_return:+.1f}" if real else "")]
        for row, line in enumerate(lines):
            screen.blit(font.render(line, True, (255, 255, 255)), (4, side + 4 + 20 * row))
        pygame.display.flip()

    frame, dreamed_return, real_return, reward = 0, 0.0, 0.0, 0.0
    draw(reward, dreamed_return, real_return, frame)
    start = time.perf_counter()
    try:
        while not args.frames or frame < args.frames:
            if any(e.type == pygame.QUIT or (e.type == pygame.KEYDOWN and e.key in (pygame.K_ESCAPE, pygame.K_q))
                   for e in pygame.event.get()):
                break
            if scripted is not None and frame == len(scripted):
                break
            with torch.no_grad(), d4.autocast(device):
                if args.agent:
                    logits = agent.heads.policy_logits(features, distance=0)
                    action = d4.sample_actions(logits, generator)[:, None]                        # (1, 1, dims)
                else:
                    keys = scripted[frame] if scripted is not None else keyboard_keys(pygame)
                    action = torch.from_numpy(keys_to_action(keys, bins)).to(device)[None, None]
                z = agent.dynamics.denoise(cache, action, noise(1), steps, agent=True)
                features = agent.dynamics.observe(cache, z, action, noise(1), agent=True)[:, 0].float()
                reward = agent.heads.predicted_reward(features).item()   # the reward that arrived with z
                recent = (recent + [z])[-tokenizer.window:]
                dreams.append(d4.frames_to_uint8(tokenizer.decode(torch.cat(recent, dim=1))[:, -1].float())[0])
            dreamed_return += reward
            frame += 1
            if real is not None:
                image, real_reward, ended = env_step(env, bins, action[0, 0].cpu().numpy(), multi)
                real.append(image)
                real_return += real_reward
            draw(reward, dreamed_return, real_return, frame)
            if real is not None and ended:
                print("the real episode ended")
                break
            if args.fps > 0:
                clock.tick(args.fps)
    finally:
        seconds = time.perf_counter() - start
        pygame.quit()
        if real is not None:
            env.close()
    if args.video:
        columns, fps = ([np.stack(real)] if real else []) + [np.stack(dreams)], args.fps or 15
        if args.video.endswith(".gif"):   # for the README: looping, upscaled 2x
            import imageio

            frames = np.concatenate(columns, axis=2).repeat(2, axis=1).repeat(2, axis=2)
            imageio.mimwrite(args.video, list(frames), duration=1000 / fps, loop=0)
        else:
            d4.write_video(args.video, columns, fps=round(fps))
    print(f"predicted return {dreamed_return:+.2f}" + (f", real return {real_return:+.2f}" if real else ""))
    print(f"frames/s: {frame / max(seconds, 1e-9):.1f}")


if __name__ == "__main__":
    d4.run_cli(main)
