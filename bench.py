"""Speed and memory of the training steps, one row per preset, each measured in a fresh process:
frames/s, peak memory (CUDA max allocated on a GPU, peak RSS on the CPU), model FLOPs per step (counted by
torch's FlopCounterMode, attention included) and the achieved fraction of this machine's measured matmul rate:
the tokenizer's step, and the dynamics step with and without activation checkpointing, each compiled where the
preset compiles that stage (--compile / --no-compile to force). Then generation frames/s with and without the KV
cache at K = 1, 2, 4 shortcut steps, batch 1 and a large batch. Then the simulators: steps/s and frames/s of
MultiCarRacing-v0 with N = 1, 2, 4 cars next to CarRacing-v3, and CarRacing-v3 as the stages see it (repeats,
resets, resizing) with and without drawing only the returned frames.

    python bench.py --presets tiny small            # the CPU table in the README
    python bench.py --device cuda                   # every preset on the GPU
"""
import argparse
import multiprocessing
import resource
import time

import gymnasium as gym
import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import dreamer4 as d4


def attention_flops(query, key, value, *args, **kwargs):
    """2 matmuls of (Lq x d) by (d x Lk) and (Lq x Lk) by (Lk x d) per query head; any GQA grouping."""
    b, h, lq, d = query
    return 4 * b * h * lq * key[2] * d


def attention_backward_flops(grad_out, query, key, value, *args, **kwargs):
    return 2 * attention_flops(query, key, value)


# The CPU kernel behind scaled_dot_product_attention is not in FlopCounterMode's table (CUDA's kernels are).
CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: attention_flops,
                 torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: attention_backward_flops}


def matmul_rate(device):
    """FLOP/s of a large square matmul: fp32 on the CPU, bf16 on CUDA (the dtypes training uses there)."""
    n, dtype = (2048, torch.float32) if device.type == "cpu" else (8192, torch.bfloat16)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    repeats = 10
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * n ** 3 * repeats / (time.perf_counter() - start)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def flag(name, value):
    """--name / --no-name, or nothing for None (the preset's value)."""
    return [] if value is None else [f"--{name}" if value else f"--no-{name}"]


def compile_flag(stage, value):
    """--compile STAGE / --compile '' (none), or nothing for None (the preset's stages)."""
    return [] if value is None else ["--compile", stage if value else ""]


def tokenizer_step(preset, device_name, steps, warmup, checkpointing, compile):
    """Times the tokenizer's training step (train_mae.py's step) on random frames of the preset's shape; with
    --compile the warm-up steps compile it (FLOPs are counted on an eager step)."""
    argv = ["--preset", preset, "--device", device_name] + flag("checkpointing", checkpointing) + \
        compile_flag("mae", compile)
    cfg = d4.parse_config("mae", "", argv)
    device = d4.pick_device(cfg.device)
    torch.manual_seed(0)
    tokenizer = d4.Tokenizer(cfg).to(device)
    trainer = d4.Trainer(tokenizer, cfg, device)
    frames = torch.rand(cfg.batch_size, cfg.seq_len, 3, cfg.image_size, cfg.image_size, device=device)
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter:
        trainer.step(tokenizer.loss, frames)
    loss = d4.compiled(tokenizer.loss, cfg, "mae")
    seconds, peak = timed(lambda: trainer.step(loss, frames), device, steps, warmup)
    flops = counter.get_total_flops()
    return dict(row=f"tokenizer train ({preset})", device=str(device), checkpointing=cfg.checkpointing,
                compile=d4.compiles(cfg, "mae"),
                frames=cfg.batch_size * cfg.seq_len, frames_per_s=cfg.batch_size * cfg.seq_len / seconds,
                ms_per_step=1000 * seconds, peak_mib=peak / 2 ** 20, gflop_per_step=flops / 1e9,
                achieved=flops / seconds / matmul_rate(device), params_m=sum(p.numel() for p in
                                                                             tokenizer.parameters()) / 1e6)


def dynamics_step(preset, device_name, steps, warmup, checkpointing, compile):
    """Times the dynamics training step (shortcut forcing, bootstrap term on) on random latents of the preset's
    shape; with --compile as the tokenizer's."""
    cfg = d4.parse_config("dynamics", "", ["--preset", preset, "--device", device_name] +
                          flag("checkpointing", checkpointing) + compile_flag("dynamics", compile))
    device = d4.pick_device(cfg.device)
    torch.manual_seed(0)
    dynamics = d4.Dynamics(cfg, [cfg.action_bins] * 3).to(device)
    trainer = d4.Trainer(dynamics, cfg, device)
    latents = torch.rand(cfg.batch_size, cfg.dyn_seq_len, cfg.num_latents, cfg.latent_dim, device=device) * 2 - 1
    actions = torch.randint(0, cfg.action_bins, (cfg.batch_size, cfg.dyn_seq_len, 3), device=device)
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter:
        trainer.step(dynamics.loss, latents, actions)
    loss = d4.compiled(dynamics.loss, cfg, "dynamics")
    seconds, peak = timed(lambda: trainer.step(loss, latents, actions), device, steps, warmup)
    flops = counter.get_total_flops()
    frames = cfg.batch_size * cfg.dyn_seq_len
    return dict(row=f"dynamics train ({preset})", device=str(device), checkpointing=checkpointing,
                compile=d4.compiles(cfg, "dynamics"), frames=frames,
                frames_per_s=frames / seconds, ms_per_step=1000 * seconds, peak_mib=peak / 2 ** 20,
                gflop_per_step=flops / 1e9, achieved=flops / seconds / matmul_rate(device),
                params_m=sum(p.numel() for p in dynamics.parameters()) / 1e6)


def generation_speed(preset, device_name, batch, steps, use_cache, context=16, horizon=64):
    """Generated frames/s: a 16-frame context, then a 64-frame open-loop rollout."""
    cfg = d4.parse_config("dynamics", "", ["--preset", preset, "--device", device_name])
    device = d4.pick_device(cfg.device)
    torch.manual_seed(0)
    dynamics = d4.Dynamics(cfg, [cfg.action_bins] * 3).to(device).eval()
    latents = torch.rand(batch, context, cfg.num_latents, cfg.latent_dim, device=device) * 2 - 1
    actions = torch.randint(0, cfg.action_bins, (batch, context + horizon, 3), device=device)
    generate = lambda: dynamics.generate(latents, actions[:, :context], actions[:, context:], steps,  # noqa: E731
                                         use_cache=use_cache)
    with d4.autocast(device):
        seconds, _ = timed(generate, device, 1, 1)
    return batch * horizon / seconds


def timed(step, device, steps, warmup):
    """Seconds per call after `warmup` untimed calls, and peak memory (CUDA allocated, else process RSS)."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return (time.perf_counter() - start) / steps, peak


def env_speed(env_id, cars, steps):
    """Simulator steps/s at native 96x96 with a fixed gas-and-gentle-steering action, after the 50-step zoom-in
    (untimed). One step of MultiCarRacing-v0 gives one frame per car."""
    if env_id.startswith("MultiCarRacing"):
        import multi_car_racing  # noqa: F401  (registers MultiCarRacing-v0)
    env = gym.make(env_id, **({"num_cars": cars} if env_id.startswith("MultiCarRacing") else {}))
    action = np.array([0.05, 0.3, 0.0], np.float32)
    action = np.tile(action, (cars, 1)) if env_id.startswith("MultiCarRacing") else action
    env.reset(seed=0)
    for _ in range(50):
        env.step(action)
    start = time.perf_counter()
    for _ in range(steps):
        env.step(action)
    rate = steps / (time.perf_counter() - start)
    env.close()
    return rate


def collection_speed(preset, skip_drawing, frames):
    """Frames/s of CarRacing-v3 as the stages see it (d4.make_env: the preset's action repeat, resize and reset
    no-ops; resets included, one env), drawing only the returned frames or every simulator step."""
    cfg = d4.parse_config("mae", "", ["--preset", preset, "--wandb", "disabled"])
    env = d4.make_env(cfg)
    for wrapper in d4.wrapper_chain(env):
        if isinstance(wrapper, (d4.RepeatAction, d4.ResetNoops)):
            wrapper.skip_drawing = skip_drawing
    action = np.array([0.05, 0.3, 0.0], np.float32)
    start = time.perf_counter()
    env.reset(seed=0)
    for i in range(frames):
        _, _, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            env.reset(seed=i + 1)
    rate = frames / (time.perf_counter() - start)
    env.close()
    return rate


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=list(d4.PRESETS), choices=list(d4.PRESETS),
                        help="presets to measure (default: all)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    parser.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=None,
                        help="force activation checkpointing on or off (default: the preset's)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="force torch.compile of both training losses on or off (default: the preset's); the "
                             "warm-up steps compile, so give at least 1")
    parser.add_argument("--env-steps", type=int, default=300, help="timed simulator steps per env row (0: none)")
    parser.add_argument("--generation-batch", type=int, default=32, help="the large batch of the generation rows")
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")   # a fresh process per row: its peak memory is its own
    header = f"{'row':28} {'device':6} {'ckpt':>5} {'compiled':>8} {'frames':>6} {'frames/s':>9} {'ms/step':>9} " \
             f"{'peak MiB':>9} {'GFLOP/step':>10} {'of matmul':>9} {'params':>8}"
    print(header)
    print("-" * len(header))
    rows = [(tokenizer_step, (preset, args.device, args.steps, args.warmup, args.checkpointing, args.compile))
            for preset in args.presets]
    rows += [(dynamics_step, (preset, args.device, args.steps, args.warmup, checkpointing, args.compile))
             for preset in args.presets for checkpointing in (False, True)]
    for function, arguments in rows:
        with context.Pool(1) as pool:
            r = pool.apply(function, arguments)
        print(f"{r['row']:28} {r['device']:6} {str(r['checkpointing']):>5} {str(r['compile']):>8} "
              f"{r['frames']:6d} "
              f"{r['frames_per_s']:9.1f} {r['ms_per_step']:9.1f} {r['peak_mib']:9.0f} {r['gflop_per_step']:10.2f} "
              f"{r['achieved']:9.1%} {r['params_m']:7.2f}M", flush=True)
    print(f"\n{'generation, 16-frame context, 64-frame rollout':48} {'K':>2} {'batch':>5} {'frames/s cached':>16} "
          f"{'uncached':>9}")
    for preset in args.presets:
        for batch in (1, args.generation_batch):
            for steps in (1, 2, 4):
                rates = [generation_speed(preset, args.device, batch, steps, use_cache) for use_cache in (True, False)]
                print(f"{'dynamics (' + preset + ')':48} {steps:2d} {batch:5d} {rates[0]:16.1f} {rates[1]:9.1f}",
                      flush=True)
    if args.env_steps:
        print(f"\n{'simulator':28} {'steps/s':>9} {'frames/s':>9}")
        for env_id, cars in [("CarRacing-v3", 1), ("MultiCarRacing-v0", 1), ("MultiCarRacing-v0", 2),
                             ("MultiCarRacing-v0", 4)]:
            rate = env_speed(env_id, cars, args.env_steps)
            name = env_id + (f" N={cars}" if env_id.startswith("MultiCarRacing") else "")
            print(f"{name:28} {rate:9.1f} {rate * cars:9.1f}", flush=True)
        print(f"\n{'CarRacing-v3 through make_env':32} {'frames/s, drawing returned frames':>34} {'every step':>11}")
        for preset in args.presets:
            cfg = d4.parse_config("mae", "", ["--preset", preset, "--wandb", "disabled"])
            name = f"{preset} (repeat {cfg.action_repeat}, {cfg.image_size}x{cfg.image_size})"
            rates = [collection_speed(preset, skip, args.env_steps) for skip in (True, False)]
            print(f"{name:32} {rates[0]:34.1f} {rates[1]:11.1f}", flush=True)


if __name__ == "__main__":
    d4.run_cli(main)
