"""Dreamer 4, compact: "Training Agents Inside of Scalable World Models" (Hafner, Yan, Lillicrap, 2025).

One file, read top to bottom like the paper's appendix:
  1. configuration, presets and the command line shared by the stage scripts
  2. small utilities (errors, devices, loss normalization, PSNR)
  3. the block-causal transformer (paper Sec. 3.1; SPEC Sec. 1)
  4. the causal tokenizer, a masked autoencoder (Eq. 5; SPEC Sec. 2)
  5. the interactive dynamics with shortcut forcing (Eq. 6-8; SPEC Sec. 3)
  6. the agent: heads, finetuning, imagination, PMPO and acting (Eq. 9-11; SPEC Sec. 4)
  7. environments, action binning, online collection and the episode dataset
  8. checkpoints, metrics and videos
The standard evaluation protocol and the instruments that measure learning (branch test, prior and reward-head
quality) are in evaluate.py. Equation numbers are the paper's; "SPEC" is ../shared/SPEC.md. Choices the paper
leaves open are marked (ours).
"""
import argparse
import dataclasses
import json
import math
import os
import random
import signal
import sys
import textwrap
import time
import warnings
from contextlib import closing, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


# ==================================================================================================================
# 1. Configuration, presets and the common command line
# ==================================================================================================================
def arg(default, help, stage, check=None):
    """A Config field: its default, its one-line --help text, the --help group (stage) it is listed under and the
    range a number must lie in (a key of CHECKS; parse_config refuses others)."""
    return field(default=default, metadata={"help": help, "stage": stage, "check": check})


def flag(name):
    """The command-line flag of a Config field: num_latents -> --num-latents."""
    return "--" + name.replace("_", "-")


CHECKS = {">=0": (lambda x: x >= 0, ">= 0"), ">=1": (lambda x: x >= 1, ">= 1"), ">=2": (lambda x: x >= 2, ">= 2"),
          ">0": (lambda x: x > 0, "> 0"), "[0,1]": (lambda x: 0 <= x <= 1, "in [0, 1]"),
          "[0,1)": (lambda x: 0 <= x < 1, "in [0, 1)"), "(0,1)": (lambda x: 0 < x < 1, "in (0, 1)"),
          "-1|>=0": (lambda x: x == -1 or x >= 0, "-1 or >= 0")}


@dataclass
class Config:
    """Every setting of every stage. Field defaults are the `default` preset (one workstation GPU, 96x96).
    (ours) marks values the paper leaves open; docs/results.md has the measurements behind them."""
    # run
    env: str = arg("CarRacing-v3", "gymnasium env id (pixel observations, or rendered frames)", "run")
    env_kwargs: str = arg("{}", "gymnasium.make keywords as JSON, e.g. '{\"continuous\": false}'", "run")
    run_dir: str = arg("runs/carracing", "directory every stage of one run reads and writes", "run")
    preset: str = arg("default", "tiny (seconds, for tests) | small (2-core CPU) | default (one GPU, 96x96)", "run")
    device: str = arg("auto", "where to run", "run")
    compile: str = arg("", "stages whose training loss is torch.compiled: mae,dynamics (ours)", "run")
    seed: int = arg(0, "seed of the envs, sampling and initialization", "run", check=">=0")
    wandb: str = arg("offline", "wandb mode (disabled: wandb is not imported)", "run")
    resume: bool = arg(False, "continue the stage's checkpoint (without: refuse to overwrite it)", "run")
    mae_steps: int = arg(50_000, "tokenizer training steps", "tokenizer", check=">=1")
    # environment and data
    image_size: int = arg(96, "frame side in pixels after resizing", "data", check=">=1")
    action_repeat: int = arg(2, "env steps per action, rewards summed (ours)", "data", check=">=1")
    zoom_skip: int = arg(50, "no-op env steps after a CarRacing reset (its zoom-in)", "data", check=">=0")
    max_episode_steps: int = arg(0, "episode time limit in env steps; 0: the env's own", "data", check=">=0")
    action_bins: int = arg(33, "bins per continuous action dimension, both bounds included (ours)",
                           "data", check=">=2")
    collect_frames: int = arg(100_000, "frames the random explorer collects", "data", check=">=1")
    explore_rest: str = arg("auto", "per action dim, chance the explorer holds it at 0; auto: 0,0,0.9 "
                                    "for CarRacing, else 0 (ours)", "data")
    num_envs: int = arg(0, "parallel envs for collection; 0: one per CPU core", "data", check=">=0")
    holdout_every: int = arg(10, "every n-th episode, from the first, is held out", "data", check=">=2")
    # transformer (shared by tokenizer and dynamics)
    time_every: int = arg(4, "every n-th block attends over time, the others over space", "transformer", check=">=1")
    mlp_ratio: float = arg(8 / 3, "SwiGLU hidden width, in multiples of the model width", "transformer", check=">0")
    softcap: float = arg(0.0, "attention-logit soft cap (paper: 50); >0: explicit, slower attention",
                         "transformer", check=">=0")
    checkpointing: bool = arg(True, "activation checkpointing per block (less memory, more compute)", "transformer")
    # tokenizer (SPEC Sec. 2)
    patch_size: int = arg(8, "patch side in pixels", "tokenizer", check=">=1")
    tok_dim: int = arg(512, "tokenizer width", "tokenizer", check=">=1")
    tok_heads: int = arg(8, "tokenizer query heads", "tokenizer", check=">=1")
    tok_kv_heads: int = arg(4, "tokenizer key/value heads (GQA)", "tokenizer", check=">=1")
    tok_enc_layers: int = arg(8, "tokenizer encoder blocks", "tokenizer", check=">=1")
    tok_dec_layers: int = arg(8, "tokenizer decoder blocks", "tokenizer", check=">=1")
    num_latents: int = arg(64, "latent tokens per frame (N_latent)", "tokenizer", check=">=1")
    latent_dim: int = arg(32, "width per latent token (D_latent), tanh-squashed", "tokenizer", check=">=1")
    max_mask_prob: float = arg(0.9, "MAE: a frame masks p ~ U(0, this) of its patches", "tokenizer", check="[0,1)")
    lpips_weight: float = arg(0.0, "LPIPS loss weight (paper: 0.2; needs lpips); 0: off", "tokenizer", check=">=0")
    # interactive dynamics (SPEC Sec. 3)
    dynamics_steps: int = arg(100_000, "dynamics training steps", "dynamics", check=">=1")
    dyn_dim: int = arg(512, "dynamics width", "dynamics", check=">=1")
    dyn_heads: int = arg(8, "dynamics query heads", "dynamics", check=">=1")
    dyn_kv_heads: int = arg(2, "dynamics key/value heads (GQA)", "dynamics", check=">=1")
    dyn_layers: int = arg(12, "dynamics blocks", "dynamics", check=">=1")
    dyn_time_every: int = arg(0, "every n-th dynamics block attends over time; 0: --time-every",
                              "dynamics", check=">=0")
    latent_tokens: int = arg(16, "tokens per frame holding z (S_z); must divide N_latent", "dynamics", check=">=1")
    action_tokens: int = arg(1, "action tokens per frame (S_a)", "dynamics", check=">=1")
    register_tokens: int = arg(4, "register tokens per frame (S_r)", "dynamics", check=">=0")
    max_shortcut_steps: int = arg(64, "K_max: the finest step size is d_min = 1/K_max", "dynamics", check=">=2")
    bootstrap_fraction: float = arg(0.25, "fraction of frames trained with the bootstrap term, d > d_min (ours)",
                                    "dynamics", check="[0,1]")
    bootstrap_start: float = arg(0.5, "fraction of the dynamics steps trained before the bootstrap term starts "
                                      "(ours)", "dynamics", check="[0,1]")
    single_frame_fraction: float = arg(0.3, "fraction of sequences trained as independent single frames",
                                       "dynamics", check="[0,1]")
    context_signal: float = arg(58 / 64, "signal level tau of context frames in generation, on the training grid "
                                         "k / K_max (SPEC Sec. 3)", "dynamics", check="(0,1)")
    sampling_steps: int = arg(4, "shortcut steps per generated frame (K)", "dynamics", check=">=1")
    dyn_seq_len: int = arg(32, "frames per dynamics training sequence", "dynamics", check=">=2")
    eval_context: int = arg(8, "real context frames before an evaluation rollout", "dynamics", check=">=1")
    eval_horizon: int = arg(16, "frames generated open-loop per evaluation rollout", "dynamics", check=">=1")
    # agent (SPEC Sec. 4)
    finetune_steps: int = arg(20_000, "finetuning steps: BC, reward and continuation heads, dynamics loss on (Eq. 9)",
                              "agent", check=">=1")
    imagination_steps: int = arg(10_000, "imagination training steps", "agent", check=">=1")
    mtp_length: int = arg(8, "multi-token prediction: policy and reward heads predict L steps ahead",
                          "agent", check=">=1")
    reward_bins: int = arg(255, "two-hot bins of the reward and value heads, even in symlog space",
                           "agent", check=">=2")
    reward_range: float = arg(20.0, "the two-hot bins span [-this, this] in symlog space (ours)", "agent", check=">0")
    imagination_context: int = arg(8, "real context frames before an imagined rollout", "agent", check=">=1")
    imagination_horizon: int = arg(32, "imagined steps per rollout (H, ours)", "agent", check=">=1")
    discount: float = arg(0.997, "gamma of the lambda-returns", "agent", check="[0,1]")
    return_lambda: float = arg(0.95, "lambda of the lambda-returns (ours)", "agent", check="[0,1]")
    pmpo_alpha: float = arg(0.5, "PMPO weight of the positive-advantage set (Eq. 11)", "agent", check="[0,1]")
    pmpo_beta: float = arg(0.3, "weight of the KL to the frozen behaviour-cloned policy (Eq. 11)",
                           "agent", check=">=0")
    online_beta: float = arg(-1.0, "online rounds: weight of the KL to the BC prior refit on the grown data, from "
                                   "round 1 (ours); -1: --pmpo-beta in every round", "agent", check="-1|>=0")
    policy_lr: float = arg(3e-4, "AdamW learning rate of the policy and value heads in imagination",
                           "agent", check=">0")
    eval_episodes: int = arg(20, "seeded real-env episodes per policy evaluation, all policies on the same tracks",
                             "agent", check=">=1")
    eval_max_episode_steps: int = arg(0, "evaluation time limit in env steps; 0: the env's own (the standard "
                                         "protocol; others only for quick tests)", "agent", check=">=0")
    branch_contexts: int = arg(16, "real contexts of the branch test at each evaluation (evaluate.branch_test); "
                                   "0: off", "agent", check=">=0")
    iterations: int = arg(0, "online rounds after imagination: collect with the policy, finetune, imagine "
                             "(ours)", "agent", check=">=0")
    hours: float = arg(0.0, "online rounds: the next round starts only if, at the last round's pace, it and the "
                            "collection scoring its policy end within this many hours of training (the tokenizer's, "
                            "dynamics' and agent's elapsed_s); 0: no limit (ours)", "agent", check=">=0")
    iteration_episodes: int = arg(10, "episodes collected with the policy per online round", "agent", check=">=1")
    agent_seeds: int = arg(1, "run.py: agent stages started side by side at seeds --seed, --seed + 1, ...; after "
                              "round --pick-round only the best-collecting one continues (ours)", "agent",
                           check=">=1")
    pick_round: int = arg(8, "run.py with --agent-seeds above 1: the online round whose policy's collection picks "
                             "the agent (ours)", "agent", check=">=1")
    explore_prob: float = arg(0.2, "online collection: per-step probability of acting with the explorer",
                              "agent", check="[0,1]")
    online_share: float = arg(0.5, "online rounds: share of each finetuning and imagination batch drawn from the "
                                   "policy's own episodes (ours)", "agent", check="[0,1]")
    # optimization (every stage)
    batch_size: int = arg(32, "sequences per batch", "optimization", check=">=1")
    seq_len: int = arg(8, "frames per tokenizer sequence (its causal window)", "tokenizer", check=">=1")
    lr: float = arg(3e-4, "AdamW peak learning rate", "optimization", check=">0")
    warmup_steps: int = arg(1000, "steps of linear learning-rate warm-up", "optimization", check=">=1")
    cooldown: float = arg(0.2, "final fraction of a stage's steps, the learning rate decaying to 0 (ours)",
                          "optimization", check="[0,1]")
    weight_decay: float = arg(0.01, "AdamW weight decay", "optimization", check=">=0")
    grad_clip: float = arg(1.0, "gradient-norm clip", "optimization", check=">0")
    loss_floor: float = arg(0.1, "least RMS (nats) the agent's likelihood loss terms are divided by (ours)",
                            "agent", check=">0")
    eval_every: int = arg(2000, "steps between evaluations (scores, videos)", "optimization", check=">=1")
    save_every: int = arg(1000, "steps between checkpoints (and at the end or Ctrl-C)",
                          "optimization", check=">=1")
    eval_sequences: int = arg(64, "held-out sequences per evaluation", "optimization", check=">=1")
    log_every: int = arg(10, "steps between loss lines in metrics.jsonl", "optimization", check=">=1")


PRESETS = {
    "tiny": dict(image_size=32, collect_frames=320, max_episode_steps=200, zoom_skip=4, holdout_every=2,
                 checkpointing=False, patch_size=8, tok_dim=32, tok_heads=2, tok_kv_heads=1, tok_enc_layers=2,
                 tok_dec_layers=2, num_latents=4, latent_dim=8, batch_size=4, seq_len=4, lr=1e-3, warmup_steps=5,
                 mae_steps=20, eval_every=10, save_every=10, eval_sequences=4, dynamics_steps=20, dyn_dim=32,
                 dyn_heads=2, dyn_kv_heads=1, dyn_layers=2, latent_tokens=2, register_tokens=1, dyn_seq_len=6,
                 eval_context=2, eval_horizon=3, finetune_steps=10, imagination_steps=10, mtp_length=3,
                 imagination_context=2, imagination_horizon=3, eval_episodes=2, eval_max_episode_steps=40,
                 branch_contexts=2, iteration_episodes=1),
    "small": dict(image_size=64, action_repeat=4, collect_frames=8000, max_episode_steps=300, checkpointing=False,
                  compile="mae", patch_size=8, dyn_time_every=2, cooldown=0.5, bootstrap_start=0.3, tok_dim=128,
                  tok_heads=4,
                  tok_kv_heads=2, tok_enc_layers=4, tok_dec_layers=4, num_latents=16, latent_dim=16,
                  batch_size=16, seq_len=4, lr=1e-3, warmup_steps=100, mae_steps=1000, eval_every=1750,
                  save_every=250, eval_sequences=64, dynamics_steps=5000, dyn_dim=128, dyn_heads=4, dyn_kv_heads=2,
                  dyn_layers=4, latent_tokens=4, register_tokens=2, dyn_seq_len=16, eval_context=8,
                  eval_horizon=8, finetune_steps=400, imagination_steps=300, imagination_context=4,
                  imagination_horizon=16, iteration_episodes=10),
    "default": dict(),
}
STAGE_STEPS = {"mae": "mae_steps", "dynamics": "dynamics_steps", "policy": "imagination_steps"}   # which field `--steps` sets in each stage script


class ConfigError(Exception):
    """A problem with the user's input (flags, files, env id): reported as one line, exit status 2."""


class TrainingError(Exception):
    """Training cannot go on (e.g. only non-finite losses): reported as one line, exit status 1."""


GROUPS = {"run": "run", "data": "environment and data", "transformer": "transformer (tokenizer and dynamics)",
          "tokenizer": "tokenizer (train_mae.py)", "dynamics": "dynamics (train_dynamics.py)",
          "agent": "agent (train_policy.py)", "optimization": "optimization (every stage)"}
SHOWN = {"mae": ["tokenizer", "run", "data", "transformer", "optimization"],   # --help order; the rest by name
         "dynamics": ["dynamics", "run", "data", "transformer", "optimization"],
         "policy": ["agent", "run", "data", "optimization"]}
GROUP_SCRIPT = {"tokenizer": "train_mae.py", "transformer": "train_mae.py", "dynamics": "train_dynamics.py",
                "agent": "train_policy.py"}


def parse_config(stage, description, argv=None):
    """The common CLI: every Config field is a flag; the preset fills what the command line leaves out. --help
    lists this stage's groups of flags, its own first, each flag with its default and the presets' values; the
    other stages' flags, accepted so that one command line serves all three (run.py), are listed by name."""
    parser = argparse.ArgumentParser(description=description, usage="%(prog)s [flags]",
                                     formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(
                                         prog, max_help_position=30, width=118))
    shown = SHOWN[stage]
    others = {name: [] for name in GROUPS if name not in shown}
    for f in dataclasses.fields(Config):
        if f.metadata["stage"] in others:
            others[f.metadata["stage"]].append(flag(f.name))
    groups = {name: parser.add_argument_group(GROUPS[name]) for name in shown}
    for name, flags in others.items():
        listed = textwrap.fill(f"{', '.join(flags)}: see {GROUP_SCRIPT[name]} --help", 114,
                               break_on_hyphens=False)
        groups[name] = parser.add_argument_group(GROUPS[name], listed)
    groups[shown[0]].add_argument("--steps", type=int, default=argparse.SUPPRESS, metavar="N", help=(
        f"this stage's training steps (sets {flag(STAGE_STEPS[stage])})"))
    for f in dataclasses.fields(Config):
        option, group = flag(f.name), groups[f.metadata["stage"]]
        values = {"default": f.default, **{name: p[f.name] for name, p in PRESETS.items()
                                           if p.get(f.name, f.default) != f.default}}
        shown_values = "; ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v or repr(v)}"
                                 for k, v in values.items())
        help = argparse.SUPPRESS if f.metadata["stage"] in others else \
            f"{f.metadata['help']} ({shown_values})".replace("%", "%%")
        if f.type is bool:
            group.add_argument(option, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help)
        else:
            choices = {"preset": list(PRESETS), "device": ["auto", "cpu", "cuda"],
                       "wandb": ["online", "offline", "disabled"]}.get(f.name)
            group.add_argument(option, type=f.type, default=argparse.SUPPRESS, choices=choices, help=help,
                               metavar=None if choices else {int: "N", float: "X", str: "S"}[f.type])
    given = vars(parser.parse_args(argv))
    if "steps" in given:
        given[STAGE_STEPS[stage]] = given.pop("steps")
    preset = given.get("preset", Config.preset)
    cfg = Config(**{**PRESETS[preset], **given})
    check_config(cfg)
    return cfg


def check_config(cfg):
    """Refuses, in one line naming the flag, a number out of its range (Config's `check`), sizes that must divide
    each other and --env-kwargs that is not a JSON object: before any work is done or any file written."""
    for f in dataclasses.fields(Config):
        value, check = getattr(cfg, f.name), f.metadata["check"]
        if check and not (math.isfinite(value) and CHECKS[check][0](value)):
            raise ConfigError(f"{flag(f.name)} must be {CHECKS[check][1]}, not {value}")
    for size, part in (("image_size", "patch_size"), ("num_latents", "latent_tokens"), ("tok_dim", "tok_heads"),
                       ("tok_heads", "tok_kv_heads"), ("dyn_dim", "dyn_heads"), ("dyn_heads", "dyn_kv_heads"),
                       ("max_shortcut_steps", "sampling_steps")):
        if getattr(cfg, size) % getattr(cfg, part):
            raise ConfigError(f"{flag(part)} {getattr(cfg, part)} must divide {flag(size)} {getattr(cfg, size)}")
    for name, heads in (("tok_dim", "tok_heads"), ("dyn_dim", "dyn_heads")):
        if getattr(cfg, name) // getattr(cfg, heads) % 2:
            raise ConfigError(f"{flag(name)} / {flag(heads)} (the width per head) must be even: rotary embeddings "
                              "split it in half")
    for name in ("max_shortcut_steps", "sampling_steps"):
        if getattr(cfg, name) & (getattr(cfg, name) - 1):
            raise ConfigError(f"{flag(name)} must be a power of 2, not {getattr(cfg, name)}")
    env_kwargs(cfg)
    unknown = sorted(set(filter(None, cfg.compile.split(","))) - {"mae", "dynamics"})
    if unknown:
        raise ConfigError(f"--compile takes mae and/or dynamics, comma-separated, not {', '.join(unknown)}")
    grid = cfg.context_signal * cfg.max_shortcut_steps
    if abs(grid - round(grid)) > 1e-6 or not 0 < round(grid) < cfg.max_shortcut_steps:
        raise ConfigError(f"--context-signal {cfg.context_signal:g} is not a signal level training produces: it must "
                          f"be k / {cfg.max_shortcut_steps} (--max-shortcut-steps) with 0 < k < "
                          f"{cfg.max_shortcut_steps}, e.g. {round(grid) / cfg.max_shortcut_steps:g}")
    if cfg.agent_seeds > 1 and cfg.pick_round > cfg.iterations:
        raise ConfigError(f"--pick-round {cfg.pick_round} is past the last online round (--iterations "
                          f"{cfg.iterations}): the agent is picked in a round that runs")


def env_kwargs(cfg):
    """--env-kwargs as a dict (a one-line error unless it is a JSON object)."""
    try:
        kwargs = json.loads(cfg.env_kwargs)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--env-kwargs is not valid JSON ({e}): {cfg.env_kwargs}") from None
    if not isinstance(kwargs, dict):
        raise ConfigError(f"--env-kwargs must be a JSON object like '{{\"continuous\": false}}', not "
                          f"{cfg.env_kwargs}")
    taken = sorted(set(kwargs) & {"render_mode", "max_episode_steps"})
    if taken:
        raise ConfigError(f"--env-kwargs cannot set {', '.join(taken)}; the pipeline sets it (see "
                          "--max-episode-steps)")
    return kwargs


def run_cli(main):
    """Run a stage script's main(); user errors become one line on stderr and exit status 2, Ctrl-C exit 130
    (finished episodes and the checkpoint are on disk by then)."""
    try:
        main()
    except (ConfigError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, ConfigError) else 1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


# ==================================================================================================================
# 2. Small utilities
# ==================================================================================================================
def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name):
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is available")
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else "cpu" if name == "auto" else name)


def compiles(cfg, stage):
    """Whether --compile names this stage (mae or dynamics)."""
    return stage in cfg.compile.split(",")


def compiled(loss_fn, cfg, stage):
    """loss_fn through torch.compile if `stage` is in --compile. A training loss sees the same shapes every step,
    so it compiles once per code path, on its first steps."""
    if not compiles(cfg, stage):
        return loss_fn
    print(f"--compile {cfg.compile}: the first steps compile the loss (a minute or more on a CPU)", file=sys.stderr)
    return torch.compile(loss_fn)


def autocast(device):
    """bf16 autocast on CUDA; full precision on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


class LossNormalizer(nn.Module):
    """Divides each loss term by a running estimate of its root mean square (EMA of loss^2), so that terms of
    different scale share one optimizer (SPEC Sec. 0). `floors` maps a term's name to the least it is divided by
    (ours): a term that is nearly always ~0, like the continuation loss when terminations are rare, is otherwise
    scaled up to unit size and jumps by orders of magnitude on the rare batch where it is not ~0. The estimates
    are saved with the module's state_dict."""

    def __init__(self, decay=0.95, floors=None):
        super().__init__()
        self.decay, self.floors = decay, dict(floors or {})
        self.mean_squares = {}

    def forward(self, losses):
        total = 0.0
        for name, loss in losses.items():
            square = loss.detach().float() ** 2
            previous = self.mean_squares.get(name)
            self.mean_squares[name] = square if previous is None else self.decay * previous + (1 - self.decay) * square
            total = total + loss / self.mean_squares[name].sqrt().clamp_min(self.floors.get(name, 1e-8))
        return total

    def get_extra_state(self):
        return {name: value.item() for name, value in self.mean_squares.items()}

    def set_extra_state(self, state):
        self.mean_squares = {name: torch.tensor(value) for name, value in state.items()}


def psnr(prediction, target):
    """Peak signal-to-noise ratio in dB for images in [0, 1], averaged over frames. (B, T, C, H, W) -> scalar."""
    mse = ((prediction.clamp(0, 1) - target) ** 2).flatten(2).mean(-1)
    return (-10 * torch.log10(mse.clamp_min(1e-10))).mean()


# ==================================================================================================================
# 3. Block-causal transformer (SPEC Sec. 1)
#    Tokens are laid out (B, T, S, D). Space blocks attend within one frame under a modality mask; every
#    `time_every`-th block attends causally over time, each spatial slot to its own past (RoPE over time).
# ==================================================================================================================
class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class SwiGLU(nn.Module):
    def __init__(self, dim, ratio):
        super().__init__()
        hidden = int(dim * ratio)
        self.gate_and_value = nn.Linear(dim, 2 * hidden, bias=False)
        self.out = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        gate, value = self.gate_and_value(x).chunk(2, dim=-1)
        return self.out(F.silu(gate) * value)


def rope(x, positions, base=10_000.0):
    """Rotary position embedding over the sequence axis. x: (N, H, L, hd); positions: (L,) time indices."""
    half = x.shape[-1] // 2
    frequencies = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = positions.float()[:, None] * frequencies[None]   # (L, hd/2)
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x.float()[..., :half], x.float()[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


def softcapped_attention(q, k, v, mask, causal, cap):
    """Explicit attention with logits squashed to cap * tanh(logits / cap) (paper); SDPA cannot do this."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    logits = cap * torch.tanh(logits / cap)
    if causal:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    return logits.softmax(dim=-1) @ v


class Attention(nn.Module):
    """Grouped-query attention with QK-norm. Runs on (N, L, D) sequences; the block decides what N and L are."""

    def __init__(self, dim, heads, kv_heads, softcap):
        super().__init__()
        assert dim % heads == 0 and heads % kv_heads == 0, "dim must split into heads, heads into kv groups"
        self.heads, self.kv_heads, self.head_dim, self.softcap = heads, kv_heads, dim // heads, softcap
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * kv_heads * self.head_dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)
        self.q_norm, self.k_norm = RMSNorm(self.head_dim), RMSNorm(self.head_dim)

    def forward(self, x, mask=None, causal=False, positions=None, past=None, beside=False):
        """Returns the output and this call's keys and values. `past` = (keys, values) of earlier positions
        (KV cache) that a single new position attends to in full. With beside=True, `past` holds the keys and
        values of another pass over the same L positions instead, and position t attends to those of positions
        before t and to its own new key (see Dynamics.bootstrap_target)."""
        n, length, dim = x.shape
        q = self.to_q(x).view(n, length, self.heads, self.head_dim).transpose(1, 2)              # (N, H, L, hd)
        k, v = self.to_kv(x).view(n, length, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (N, KV, L, hd)
        q, k = self.q_norm(q), self.k_norm(k)
        if positions is not None:
            q, k = rope(q, positions), rope(k, positions)
        new = (k, v)
        if past is not None:
            assert beside or length == 1, "with a KV cache, add one frame at a time"
            if beside:   # (L, 2L): the other pass's keys strictly before t, then this pass's key at t
                before = torch.ones(length, length, dtype=torch.bool, device=x.device).tril(-1)
                mask = torch.cat([before, torch.eye(length, dtype=torch.bool, device=x.device)], dim=1)
            k, v, causal = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2), False
        if self.softcap > 0:
            out = softcapped_attention(q, k, v, mask, causal, self.softcap)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
        return self.to_out(out.transpose(1, 2).reshape(n, length, dim)), new


class Block(nn.Module):
    """Pre-norm transformer block attending either over space (within a frame) or over time (causal)."""

    def __init__(self, dim, heads, kv_heads, cfg, over_time):
        super().__init__()
        self.over_time = over_time
        self.attn_norm, self.mlp_norm = RMSNorm(dim), RMSNorm(dim)
        self.attn = Attention(dim, heads, kv_heads, cfg.softcap)
        self.mlp = SwiGLU(dim, cfg.mlp_ratio)

    def forward(self, x, space_mask, past=None, start=0, beside=False):
        """Returns the output and, for a time block, this call's keys and values (for a KV cache). `start` is the
        time index of x's first frame (RoPE), i.e. the number of frames before it; `beside` see Attention."""
        b, t, s, d = x.shape                                                # (B, T, S, D)
        h = self.attn_norm(x)
        new = None
        if self.over_time:
            h = h.transpose(1, 2).reshape(b * s, t, d)                      # (B*S, T, D)
            h, new = self.attn(h, causal=True, positions=torch.arange(start, start + t, device=x.device), past=past,
                               beside=beside)
            h = h.view(b, s, t, d).transpose(1, 2)                          # (B, T, S, D)
        else:
            h = self.attn(h.reshape(b * t, s, d), mask=space_mask)[0].view(b, t, s, d)
        x = x + h
        return x + self.mlp(self.mlp_norm(x)), new


class Transformer(nn.Module):
    """Stack of space blocks with a causal time block every `time_every` blocks (at least one; 0 means
    cfg.time_every), final RMSNorm."""

    def __init__(self, dim, depth, heads, kv_heads, cfg, time_every=0):
        super().__init__()
        period = min(time_every or cfg.time_every, depth)
        self.blocks = nn.ModuleList(Block(dim, heads, kv_heads, cfg, over_time=(i + 1) % period == 0)
                                    for i in range(depth))
        self.norm = RMSNorm(dim)
        self.checkpointing = cfg.checkpointing

    def forward(self, x, space_mask, cache=None, commit=False, beside=False):
        """x (B, T, S, D) -> (B, T, S, D). With a KVCache, the time blocks attend to the cached frames too
        (then T = 1 unless the cache is empty); commit=True appends this call's frames to the cache. beside=True:
        the cache holds a pass over these same T frames, and frame t attends to its frames before t and to itself
        (see Dynamics.bootstrap_target)."""
        start = cache.frames if cache is not None and not beside else 0
        for i, block in enumerate(self.blocks):
            past = cache.layers.get(i) if cache is not None else None
            if self.checkpointing and torch.is_grad_enabled():
                x, new = checkpoint(block, x, space_mask, past, start, beside, use_reentrant=False)
            else:
                x, new = block(x, space_mask, past, start, beside)
            if commit and new is not None:
                kv = new if past is None else tuple(torch.cat(p, dim=2) for p in zip(past, new))
                cache.layers[i] = kv if cache.window is None else tuple(p[:, :, -cache.window:] for p in kv)
        if commit:
            cache.frames += x.shape[1]
        return self.norm(x)


class KVCache:
    """Keys and values of past frames for every time block, so that each new frame costs one frame of compute.
    layers: block index -> (keys, values), each (B*S, KV heads, T_past, head dim); frames: how many frames were
    committed (the time index of the next one). With a window, only the last `window` frames are kept (ours: a
    sliding context for episodes longer than the training sequences; RoPE is relative, so the positions keep
    counting. The kept frames' keys still carry what earlier layers saw of the dropped ones, an approximation
    of re-encoding the window from scratch)."""

    def __init__(self, window=None):
        self.layers, self.frames, self.window = {}, 0, window


def space_mask(groups, may_see):
    """(S, S) bool attention mask for one frame, True where the query token (row) may attend to the key token
    (column). `groups` maps each modality to its token count, in layout order; `may_see` maps each modality to
    the modalities it attends to."""
    names = [name for name, count in groups.items() for _ in range(count)]
    return torch.tensor([[key in may_see[query] for key in names] for query in names])


# ==================================================================================================================
# 4. Causal tokenizer (Eq. 5; SPEC Sec. 2)
#    Encoder tokens per frame: [patches | latents]; latents see everything, patches only patches.
#    Decoder tokens per frame: [latents | readouts]; readouts see latents and readouts, latents only latents.
#    Both are causal in time. The bottleneck is tanh(linear(latent outputs)): z_t of shape (N_latent, D_latent).
#    Pixels are standardized per position with the training frames' mean and std (ours, see set_pixel_statistics);
#    the decoder predicts standardized pixels, mapped back before the pixel-space MSE.
# ==================================================================================================================
class Tokenizer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ConfigError(f"--image-size {cfg.image_size} is not a multiple of --patch-size {cfg.patch_size}")
        self.image_size, self.patch_size, self.max_mask_prob = cfg.image_size, cfg.patch_size, cfg.max_mask_prob
        self.window = cfg.seq_len   # frames per training window: the most context it should see (causal_windows)
        self.num_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.num_latents = cfg.num_latents
        dim, patch_dim = cfg.tok_dim, 3 * cfg.patch_size ** 2
        embedding = lambda *shape: nn.Parameter(torch.randn(*shape) * 0.02)  # noqa: E731
        # encoder
        self.patch_in = nn.Linear(patch_dim, dim)
        self.patch_space = embedding(self.num_patches, dim)     # learned space embedding per patch slot
        self.mask_token = embedding(dim)                         # replaces masked patches (MAE)
        self.latent_tokens = embedding(cfg.num_latents, dim)     # learned latent tokens, one per latent slot
        self.encoder = Transformer(dim, cfg.tok_enc_layers, cfg.tok_heads, cfg.tok_kv_heads, cfg)
        self.to_latent = nn.Linear(dim, cfg.latent_dim)
        # decoder
        self.from_latent = nn.Linear(cfg.latent_dim, dim)
        self.latent_space = embedding(cfg.num_latents, dim)
        self.readout_tokens = embedding(self.num_patches, dim)  # learned patch-readout tokens, one per patch slot
        self.decoder = Transformer(dim, cfg.tok_dec_layers, cfg.tok_heads, cfg.tok_kv_heads, cfg)
        self.to_pixels = nn.Linear(dim, patch_dim)
        side = cfg.image_size
        self.register_buffer("pixel_mean", torch.full((3, side, side), 0.5))   # saved with the model
        self.register_buffer("pixel_std", torch.full((3, side, side), 0.5))
        self.register_buffer("encoder_mask", space_mask(
            {"patch": self.num_patches, "latent": cfg.num_latents},
            {"patch": ["patch"], "latent": ["patch", "latent"]}), persistent=False)
        self.register_buffer("decoder_mask", space_mask(
            {"latent": cfg.num_latents, "readout": self.num_patches},
            {"latent": ["latent"], "readout": ["latent", "readout"]}), persistent=False)
        if cfg.lpips_weight > 0:
            try:
                import lpips
            except ImportError:
                raise ConfigError("--lpips-weight > 0 needs the lpips package: pip install lpips") from None
            self.lpips = lpips.LPIPS(net="alex").eval().requires_grad_(False)
        self.lpips_weight = cfg.lpips_weight

    @torch.no_grad()
    def set_pixel_statistics(self, frames, std_floor=0.02):
        """(ours) Per-pixel mean and std of training frames, uint8 (N, H, W, 3), std floored at `std_floor`.
        CarRacing frames differ little from their mean frame; standardized, the part that varies is O(1) and the
        latents carry it instead of collapsing to a constant (docs/results.md)."""
        frames = torch.from_numpy(frames).to(self.pixel_mean.device).permute(0, 3, 1, 2).float() / 255
        self.pixel_mean.copy_(frames.mean(0))
        self.pixel_std.copy_(frames.std(0).clamp_min(std_floor))

    def check_frames(self, frames):
        expected = (3, self.image_size, self.image_size)
        if frames.ndim != 5 or tuple(frames.shape[2:]) != expected:
            raise ValueError(f"expected frames shaped (B, T, {', '.join(map(str, expected))}), "
                             f"got {tuple(frames.shape)}")

    def patchify(self, frames):
        b, t, c, h, w = frames.shape                                        # (B, T, C, H, W)
        p = self.patch_size
        x = frames.reshape(b, t, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4, 6)
        return x.reshape(b, t, (h // p) * (w // p), c * p * p)              # (B, T, N_patch, C*p*p)

    def unpatchify(self, patches):
        b, t = patches.shape[:2]
        p, side = self.patch_size, self.image_size // self.patch_size
        x = patches.reshape(b, t, side, side, 3, p, p).permute(0, 1, 4, 2, 5, 3, 6)
        return x.reshape(b, t, 3, self.image_size, self.image_size)

    def random_patch_mask(self, b, t, device):
        """MAE masking: per frame p ~ U(0, max_mask_prob); each patch is masked with probability p."""
        p = torch.rand(b, t, 1, device=device) * self.max_mask_prob
        return torch.rand(b, t, self.num_patches, device=device) < p        # (B, T, N_patch), True = masked

    @property
    def streams_exactly(self):
        """With one time block, the keys and values a frame gives it depend on that frame alone, so encoding one
        frame at a time with a KVCache of the window's earlier frames equals re-encoding the whole window
        (causal_windows) at the cost of one frame."""
        return sum(block.over_time for block in self.encoder.blocks) == 1

    def encode(self, frames, patch_mask=None, cache=None):
        """frames (B, T, 3, H, W) float in [0, 1] -> latents z (B, T, N_latent, D_latent) in [-1, 1]. With a
        KVCache, the frames' time block also attends to the cached frames, and these frames join the cache."""
        self.check_frames(frames)
        patches = self.patch_in(self.patchify((frames - self.pixel_mean) / self.pixel_std))   # (B, T, N_patch, D)
        if patch_mask is not None:
            patches = torch.where(patch_mask[..., None], self.mask_token.to(patches.dtype), patches)
        b, t = frames.shape[:2]
        latents = self.latent_tokens.expand(b, t, -1, -1)
        x = torch.cat([patches + self.patch_space, latents.to(patches.dtype)], dim=2)   # (B, T, S, D)
        x = self.encoder(x, self.encoder_mask, cache=cache, commit=cache is not None)
        return torch.tanh(self.to_latent(x[:, :, self.num_patches:]))

    def decode(self, latents):
        """latents (B, T, N_latent, D_latent) -> frames (B, T, 3, H, W), approximately in [0, 1]."""
        b, t = latents.shape[:2]
        x = self.from_latent(latents) + self.latent_space
        readouts = self.readout_tokens.expand(b, t, -1, -1).to(x.dtype)
        x = self.decoder(torch.cat([x, readouts], dim=2), self.decoder_mask)  # (B, T, S, D)
        return self.unpatchify(self.to_pixels(x[:, :, self.num_latents:])) * self.pixel_std + self.pixel_mean

    def loss(self, frames):
        """Masked-autoencoding loss terms (Eq. 5) for a batch of frames (B, T, 3, H, W) in [0, 1]."""
        mask = self.random_patch_mask(*frames.shape[:2], frames.device)
        reconstruction = self.decode(self.encode(frames, mask)).float()
        losses = {"mse": F.mse_loss(reconstruction, frames)}
        if self.lpips_weight > 0:
            to_lpips = lambda x: x.flatten(0, 1) * 2 - 1  # noqa: E731  (lpips takes [-1, 1] images)
            losses["lpips"] = self.lpips_weight * self.lpips(to_lpips(reconstruction), to_lpips(frames)).mean()
        return losses


# ==================================================================================================================
# 5. Interactive dynamics with shortcut forcing (Eq. 6-8; SPEC Sec. 3)
#    Tokens per frame t: [action a_{t-1} (S_a) | shortcut (tau_t, d_t) | registers (S_r) | z~_t (S_z)], all
#    attending to each other within the frame and causally over time. Convention: tau = 0 is noise, 1 is clean;
#    z~ = (1 - tau) z0 + tau z1. The network predicts clean latents (x-prediction).
# ==================================================================================================================
def fourier_features(x, dim):
    """x (...) in [0, 1] -> (..., dim) sines and cosines at geometric frequencies."""
    frequencies = 2 ** torch.arange(dim // 2, device=x.device, dtype=torch.float32)
    angles = x.float()[..., None] * frequencies * math.pi
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class Dynamics(nn.Module):
    def __init__(self, cfg, action_bins, ordered=True):
        super().__init__()
        if cfg.num_latents % cfg.latent_tokens:
            raise ConfigError(f"--num-latents {cfg.num_latents} is not a multiple of --latent-tokens "
                              f"{cfg.latent_tokens}")
        dim = cfg.dyn_dim
        self.num_latents, self.latent_dim, self.latent_tokens = cfg.num_latents, cfg.latent_dim, cfg.latent_tokens
        self.max_steps, self.context_signal = cfg.max_shortcut_steps, cfg.context_signal
        self.bootstrap_fraction, self.single_frame_fraction = cfg.bootstrap_fraction, cfg.single_frame_fraction
        token_width = cfg.num_latents // cfg.latent_tokens * cfg.latent_dim
        embedding = lambda *shape: nn.Parameter(torch.randn(*shape) * 0.02)  # noqa: E731
        # actions: one embedding table per action dimension, summed with a learned base; "no action" is learned.
        # Started at the scale of the other embeddings, not nn.Embedding's N(0, 1). With `ordered` (binned
        # continuous dimensions) a bin starts as its value in [-1, 1] times a random direction plus noise, so that
        # left and right steering start opposite and neighbouring bins alike (ours; docs/results.md). Still a plain
        # lookup table that training may reshape.
        self.action_tables = nn.ModuleList(nn.Embedding(n, dim) for n in action_bins)
        with torch.no_grad():
            for table in self.action_tables:
                value = torch.linspace(-1, 1, table.num_embeddings)[:, None] if ordered else 0.0
                table.weight.copy_(torch.randn_like(table.weight) * 0.02 + value * torch.randn(dim) * 0.02)
        self.action_base, self.no_action = embedding(dim), embedding(dim)
        self.action_space = embedding(cfg.action_tokens, dim)
        # shortcut token: signal level and step size embeddings, concatenated, then projected
        self.signal_in = nn.Linear(32, dim // 2)
        self.step_table = nn.Embedding(int(math.log2(cfg.max_shortcut_steps)) + 1, dim // 2)
        self.shortcut_out = nn.Linear(dim // 2 * 2, dim)
        self.registers = embedding(cfg.register_tokens, dim)
        self.latent_in = nn.Linear(token_width, dim)
        self.latent_space = embedding(cfg.latent_tokens, dim)
        self.transformer = Transformer(dim, cfg.dyn_layers, cfg.dyn_heads, cfg.dyn_kv_heads, cfg, cfg.dyn_time_every)
        self.latent_out = nn.Linear(dim, token_width)
        self.agent_token = embedding(dim)   # SPEC Sec. 4: reads its frame; nothing reads it
        world = {"action": cfg.action_tokens, "shortcut": 1, "register": cfg.register_tokens,
                 "latent": cfg.latent_tokens}
        sees = {name: list(world) for name in world}
        self.register_buffer("mask", space_mask(world, sees), persistent=False)
        self.register_buffer("agent_mask", space_mask({**world, "agent": 1}, {**sees, "agent": [*world, "agent"]}),
                             persistent=False)

    def embed_actions(self, actions):
        """actions (B, T, dims) bin indices, -1 where no action led to the frame -> (B, T, D)."""
        present = actions[..., 0] >= 0
        summed = self.action_base + sum(table(actions[..., i].clamp_min(0)) for i, table in
                                        enumerate(self.action_tables))
        return torch.where(present[..., None], summed, self.no_action)

    def predict(self, noisy_latents, signal_level, step_size, actions, cache=None, commit=False, agent=False,
                beside=False):
        """The network (Eq. 6): noisy_latents (B, T, N_latent, D_latent), signal_level tau (B, T) in [0, 1],
        step_size d (B, T) in {1, 1/2, ..., 1/K_max}, actions (B, T, dims) bin indices (-1: none) ->
        predicted clean latents (B, T, N_latent, D_latent). With a KVCache, T = 1 frame after the cached ones.
        agent=True appends the agent token to every frame (SPEC Sec. 4) and also returns its output (B, T, D);
        no other token attends to it, so the latents are the same either way (a test checks). A cache must be
        used with the same `agent` throughout. beside=True: the cache holds a pass over these same frames, which
        each frame sees as its past (see bootstrap_target)."""
        b, t = noisy_latents.shape[:2]
        latents = self.latent_in(noisy_latents.reshape(b, t, self.latent_tokens, -1)) + self.latent_space
        step_index = torch.log2(1 / step_size).round().long()
        shortcut = self.shortcut_out(torch.cat([self.signal_in(fourier_features(signal_level, 32)),
                                                self.step_table(step_index)], dim=-1))
        x = torch.cat([(self.embed_actions(actions)[:, :, None] + self.action_space).to(latents.dtype),
                       shortcut[:, :, None].to(latents.dtype),
                       self.registers.expand(b, t, -1, -1).to(latents.dtype), latents], dim=2)   # (B, T, S, D)
        if agent:
            x = torch.cat([x, self.agent_token.expand(b, t, 1, -1).to(x.dtype)], dim=2)
        x = self.transformer(x, self.agent_mask if agent else self.mask, cache, commit, beside)
        end = x.shape[2] - agent
        out = self.latent_out(x[:, :, end - self.latent_tokens:end]).reshape(b, t, self.num_latents, self.latent_dim)
        return (out, x[:, :, -1]) if agent else out

    def sample_levels(self, b, t, device, bootstrap=True):
        """Per frame (diffusion forcing): d = d_min with probability 1 - bootstrap_fraction (always without
        `bootstrap`), else d = 1/k with k uniform over {1, 2, 4, ..., K_max / 2}; tau uniform on {0, d, ..., 1 - d}."""
        coarse = torch.randint(0, int(math.log2(self.max_steps)), (b, t), device=device)
        fraction = self.bootstrap_fraction if bootstrap else 0.0
        k = torch.where(torch.rand(b, t, device=device) < fraction, 2 ** coarse,
                        torch.full_like(coarse, self.max_steps))
        step_size = 1 / k.float()
        signal_level = (torch.rand(b, t, device=device) * k).floor() / k
        return signal_level, step_size

    def loss(self, latents, actions, bootstrap=True):
        """Shortcut forcing (Eq. 7-8) on clean latents (B, T, N_latent, D_latent) and actions (B, T, dims): one
        loss term, the mean over frames of the flow or bootstrap loss. A fraction of the sequences is trained as
        independent single frames. bootstrap=False trains every frame at d_min (the warm-up, see
        --bootstrap-start)."""
        single = round(self.single_frame_fraction * len(latents))
        total, count = 0.0, 0
        for z1, a in ((latents[single:], actions[single:]),
                      (latents[:single].flatten(0, 1)[:, None], actions[:single].flatten(0, 1)[:, None])):
            if len(z1):
                flow, boot = self.shortcut_terms(z1, a, bootstrap)
                total, count = total + (flow + boot).sum(), count + flow.numel()
        return {"dynamics": total / count}

    def shortcut_terms(self, z1, actions, bootstrap=True):
        """Per-frame weighted flow and bootstrap losses (B, T), each zero where the other term applies."""
        b, t = z1.shape[:2]
        signal_level, step_size = self.sample_levels(b, t, z1.device, bootstrap)
        tau, d = signal_level[..., None, None], step_size[..., None, None]
        noisy = (1 - tau) * torch.randn_like(z1) + tau * z1
        weight = 0.9 * signal_level + 0.1                                     # ramp w(tau)
        bootstrap = step_size > 1 / self.max_steps
        if not bootstrap.any():   # no target to compute: one forward pass
            flow = ((self.predict(noisy, signal_level, step_size, actions).float() - z1) ** 2).flatten(2).mean(-1)
            return weight * flow, torch.zeros_like(flow)
        context = KVCache()   # the keys and values every frame's prediction saw: the targets' context too
        prediction = self.predict(noisy, signal_level, step_size, actions, context, commit=True).float()
        flow = ((prediction - z1) ** 2).flatten(2).mean(-1)
        target_velocity = self.bootstrap_target(noisy, signal_level, step_size, actions, context)
        velocity = (prediction - noisy) / (1 - tau)
        boot = ((1 - tau) ** 2 * (velocity - target_velocity) ** 2).flatten(2).mean(-1)
        return weight * flow * ~bootstrap, weight * boot * bootstrap

    @torch.no_grad()
    def bootstrap_target(self, noisy, signal_level, step_size, actions, context):
        """The bootstrap target sg(b' + b'') / 2 of Eq. 7 for every frame (B, T, N, Dl), from two half steps
        of size d/2. Frame t takes both half steps on its own, seeing the frames before it exactly as its
        prediction did: through `context`, the KV cache of the prediction's pass (a test compares with one
        pass per frame). Meaningful where d > d_min."""
        tau, d = signal_level[..., None, None], step_size[..., None, None]
        bootstrap = step_size > 1 / self.max_steps
        half = torch.where(bootstrap, step_size / 2, step_size)   # d_min frames keep a valid label
        first = (self.predict(noisy, signal_level, half, actions, context, beside=True).float() - noisy) / (1 - tau)
        midway = torch.where(bootstrap[..., None, None], noisy + first * d / 2, noisy)
        second_level = torch.where(bootstrap, signal_level + half, signal_level)
        second = (self.predict(midway, second_level, half, actions, context, beside=True).float()
                  - midway) / (1 - tau - d / 2)
        return (first + second) / 2

    def corrupt(self, latents, noise):
        """Context corruption (SPEC Sec. 3): past frames are seen as context_signal * z + (1 - context_signal) * noise."""
        return self.context_signal * latents + (1 - self.context_signal) * noise

    def observe(self, cache, latents, actions, noise, agent=False):
        """Frames (B, T, N, Dl) and the actions that led to them (B, T, dims) seen as context: corrupted with
        `noise` to the context signal level, at step d_min. Appends them to the cache (None: no cache, e.g. for
        finetuning, which needs the gradient). Returns the agent token's output (B, T, D) if agent, else None."""
        b, t = latents.shape[:2]
        level = lambda value: torch.full((b, t), value, device=latents.device)  # noqa: E731
        out = self.predict(self.corrupt(latents, noise), level(self.context_signal), level(1 / self.max_steps),
                           actions, cache, commit=cache is not None, agent=agent)
        return out[1] if agent else None

    @torch.no_grad()
    def denoise(self, cache, actions, start, steps, agent=False):
        """One new frame after the cached ones: from noise `start` (B, 1, N, Dl), `steps` shortcut steps of size
        1/steps: z <- z + (z1^ - z) / (1 - tau) * d. actions (B, 1, dims) led to it. Leaves the cache unchanged."""
        b, z = len(start), start
        for j in range(steps):
            tau = j / steps
            level = lambda value: torch.full((b, 1), value, device=z.device)  # noqa: E731
            predicted = self.predict(z, level(tau), level(1 / steps), actions, cache, agent=agent)
            predicted = predicted[0] if agent else predicted
            z = z + (predicted.float() - z) / (1 - tau) * (1 / steps)
        return z

    @torch.no_grad()
    def generate(self, context_latents, context_actions, actions, steps=4, use_cache=True, generator=None):
        """Autoregressive generation (SPEC Sec. 3). context_latents (B, C, N, Dl) and the actions that led to
        them (B, C, dims); actions (B, H, dims) lead to the H new frames. Each new frame starts from noise and
        takes `steps` shortcut steps of size d = 1/steps; past frames are seen corrupted to signal level
        context_signal. Returns (B, H, N, Dl). With use_cache, each new frame costs one frame of compute; without,
        every step reruns the whole sequence (same result: a test checks)."""
        b, c = context_latents.shape[:2]
        h, device = actions.shape[1], context_latents.device
        noise = torch.randn(b, c + h, *context_latents.shape[2:], device=device, generator=generator)
        start = torch.randn(b, h, *context_latents.shape[2:], device=device, generator=generator)
        frames = []
        if use_cache:
            cache = KVCache()
            self.observe(cache, context_latents, context_actions, noise[:, :c])
            for i in range(h):
                frames.append(self.denoise(cache, actions[:, i:i + 1], start[:, i:i + 1], steps))
                self.observe(cache, frames[-1], actions[:, i:i + 1], noise[:, c + i:c + i + 1])
            return torch.cat(frames, dim=1)
        level = lambda value, n: torch.full((b, n), value, device=device)  # noqa: E731
        all_actions = torch.cat([context_actions, actions], dim=1)
        context = self.corrupt(context_latents, noise[:, :c])
        for i in range(h):
            t, z = c + i, start[:, i:i + 1]
            for j in range(steps):
                tau = j / steps
                sequence = torch.cat([context, z], dim=1)
                levels = torch.cat([level(self.context_signal, t), level(tau, 1)], dim=1)
                sizes = torch.cat([level(1 / self.max_steps, t), level(1 / steps, 1)], dim=1)
                predicted = self.predict(sequence, levels, sizes, all_actions[:, :t + 1])[:, -1:]
                z = z + (predicted.float() - z) / (1 - tau) * (1 / steps)
            frames.append(z)
            context = torch.cat([context, self.corrupt(z, noise[:, t:t + 1])], dim=1)
        return torch.cat(frames, dim=1)


# ==================================================================================================================
# 6. Agent (Eq. 9-11; SPEC Sec. 4)
#    One agent token per frame, appended after the world-model tokens: it attends to its whole frame and, in the time
#    blocks, to its own past; nothing attends to it. Small MLP heads read it. Alignment: the agent token of block t
#    (which holds a_{t-1} and z_t) predicts a_{t+n} and r_{t+n}, n = 0..L-1, where r_t arrived with frame t.
# ==================================================================================================================
def symlog(x):
    return torch.sign(x) * torch.log1p(x.abs())


def symexp(x):
    return torch.sign(x) * torch.expm1(x.abs())


def two_hot(values, support):
    """values (...) -> (..., K): weights on the two bins around symlog(value), the bins `support` being evenly
    spaced in symlog space; values outside the range go to the end bins."""
    x = symlog(values.float()).clamp(support[0], support[-1])
    above = torch.searchsorted(support, x.contiguous()).clamp(1, len(support) - 1)
    below = above - 1
    weight_above = (x - support[below]) / (support[above] - support[below])
    out = torch.zeros(*x.shape, len(support), device=x.device)
    out.scatter_(-1, below[..., None], (1 - weight_above)[..., None])
    return out.scatter_add_(-1, above[..., None], weight_above[..., None])


def two_hot_decode(logits, support):
    """(..., K) logits -> (...) values: symexp of the expected bin."""
    return symexp((logits.float().softmax(-1) * support).sum(-1))


def two_hot_loss(logits, values, support):
    """Cross-entropy of (..., K) logits to the two-hot encoding of values (...) -> (...)."""
    return -(two_hot(values, support) * logits.float().log_softmax(-1)).sum(-1)


def log_prob(logits, actions):
    """Joint log-probability of bin indices (..., dims) under per-dimension logits [(..., bins_i)] -> (...)."""
    return sum(l.float().log_softmax(-1).gather(-1, actions[..., i:i + 1]).squeeze(-1) for i, l in enumerate(logits))


def kl_divergence(logits, other):
    """KL[p || q] summed over action dimensions, per-dimension logits lists of p and q -> (...)."""
    return sum((p.float().softmax(-1) * (p.float().log_softmax(-1) - q.float().log_softmax(-1))).sum(-1)
               for p, q in zip(logits, other))


def sample_actions(logits, generator=None):
    """Bin indices (..., dims) sampled from per-dimension logits [(..., bins_i)]."""
    return torch.stack([torch.multinomial(l.float().softmax(-1).flatten(0, -2), 1, generator=generator)
                        .view(l.shape[:-1]) for l in logits], dim=-1)


def lambda_returns(rewards, continues, values, discount, lam):
    """R_t = r_{t+1} + gamma c_{t+1} ((1 - lambda) v_{t+1} + lambda R_{t+1}), R_H = v_H (SPEC Sec. 4).
    rewards, continues (B, H) arrive with frames 1..H; values (B, H + 1) of frames 0..H -> returns (B, H) of
    frames 0..H-1."""
    ret, returns = values[:, -1], []
    for t in reversed(range(rewards.shape[1])):
        ret = rewards[:, t] + discount * continues[:, t] * ((1 - lam) * values[:, t + 1] + lam * ret)
        returns.append(ret)
    return torch.stack(returns[::-1], dim=1)


def head(dim, out):
    layer = nn.Linear(dim, out)   # the output layer: L of them, one per prediction distance, side by side
    return nn.Sequential(nn.Linear(dim, dim), RMSNorm(dim), nn.SiLU(), layer)


class AgentHeads(nn.Module):
    """Policy (a categorical over the bins per action dimension), reward (symexp two-hot), both multi-token over
    L distances; continuation (logit of "frame t is not terminal") and value (symexp two-hot). `bc_policy` is the
    behaviour-cloned policy: finetuning trains it (Eq. 9), imagination keeps it fixed as PMPO's prior and trains
    `policy`, which start_policy initializes from it once; the online loop's rounds refit the prior on the grown
    data and carry the imagination-trained policy over (ours)."""

    def __init__(self, cfg, action_bins):
        super().__init__()
        dim, self.length, self.action_bins = cfg.dyn_dim, cfg.mtp_length, list(action_bins)
        self.policy = head(dim, self.length * sum(self.action_bins))
        self.bc_policy = head(dim, self.length * sum(self.action_bins))
        self.reward = head(dim, self.length * cfg.reward_bins)
        self.continuation = head(dim, 1)
        self.value = head(dim, cfg.reward_bins)
        for output in (self.reward[-1], self.value[-1]):   # start by predicting 0 (ours, as in DreamerV3)
            nn.init.zeros_(output.weight)
            nn.init.zeros_(output.bias)
        self.register_buffer("support", torch.linspace(-cfg.reward_range, cfg.reward_range, cfg.reward_bins),
                             persistent=False)

    def start_policy(self):
        """The imagination-trained policy starts as the behaviour-cloned one."""
        self.policy.load_state_dict(self.bc_policy.state_dict())

    def policy_logits(self, features, prior=False, distance=None):
        """features (..., D) -> per action dimension logits (..., L, bins_i), or (..., bins_i) at one distance."""
        out = (self.bc_policy if prior else self.policy)(features.float()).unflatten(-1, (self.length, -1))
        logits = out.split(self.action_bins, dim=-1)
        return [l if distance is None else l[..., distance, :] for l in logits]

    def reward_logits(self, features):
        return self.reward(features.float()).unflatten(-1, (self.length, -1))   # (..., L, K)

    def predicted_reward(self, features):
        return two_hot_decode(self.reward_logits(features)[..., 0, :], self.support)

    def predicted_continue(self, features):
        return torch.sigmoid(self.continuation(features.float()).squeeze(-1))

    def predicted_value(self, features):
        return two_hot_decode(self.value(features.float()), self.support)


class Agent(nn.Module):
    """The dynamics with its agent heads: finetuning (Eq. 9), imagination (SPEC Sec. 4) and PMPO (Eq. 11)."""

    def __init__(self, cfg, action_bins):
        super().__init__()
        self.dynamics, self.heads = Dynamics(cfg, action_bins), AgentHeads(cfg, action_bins)
        self.window = cfg.dyn_seq_len - 1   # past frames kept: a new frame sees dyn_seq_len frames, as in training
        self.discount, self.lam, self.alpha, self.beta = cfg.discount, cfg.return_lambda, cfg.pmpo_alpha, cfg.pmpo_beta

    def features(self, latents, actions):
        """Agent-token outputs (B, T, D) for clean latents seen as context (corrupted to the context signal level
        with step d_min), exactly as the agent sees frames when acting and imagining."""
        return self.dynamics.observe(None, latents, actions, torch.randn_like(latents), agent=True).float()

    def finetune_loss(self, latents, actions, rewards, terminated):
        """Eq. 9 on windows: latents (B, T, N, Dl), actions (B, T, dims) (row t: a_{t-1}, -1 for none), rewards
        (B, T) (row t: r_t), terminated (B, T). Terms: dynamics (shortcut forcing), bc (-sum_n ln p(a_{t+n})),
        reward (-sum_n ln p(r_{t+n})), continuation (binary cross-entropy); targets past the window are left out."""
        losses = self.dynamics.loss(latents, actions)
        features = self.features(latents, actions)
        t = latents.shape[1]
        ahead = torch.arange(t, device=latents.device)[:, None] + torch.arange(self.heads.length,
                                                                              device=latents.device)   # (T, L): t+n
        def masked(loss, valid):   # mean over frames per distance, summed over distances  # noqa: E306
            valid = valid.expand_as(loss).float()
            return ((loss * valid).sum((0, 1)) / valid.sum((0, 1)).clamp_min(1)).sum()
        targets = actions[:, (ahead + 1).clamp(max=t - 1)]                       # a_{t+n} sits in row t+n+1
        valid = (ahead + 1 < t) & (targets >= 0).all(-1)
        losses["bc"] = masked(-log_prob(self.heads.policy_logits(features, prior=True), targets.clamp_min(0)),
                              valid)
        reward_nll = two_hot_loss(self.heads.reward_logits(features), rewards[:, ahead.clamp(max=t - 1)],
                                  self.heads.support)
        losses["reward"] = masked(reward_nll, ahead < t)
        losses["continuation"] = F.binary_cross_entropy_with_logits(
            self.heads.continuation(features).squeeze(-1), (~terminated).float())
        return losses

    @torch.no_grad()
    def imagine(self, latents, actions, horizon, steps, generator=None, replay=None):
        """Rollouts inside the world model from real context windows, latents (B, C, N, Dl) and actions
        (B, C, dims): the policy samples a_t from the agent token of frame t, the dynamics generate z_{t+1} with
        `steps` shortcut steps into block t+1 = (a_t, z_{t+1}), whose heads give r_{t+1} and c_{t+1}; KV cache
        throughout, in bf16 autocast on CUDA as when finetuning and acting. replay (B, H, dims): take these actions
        instead of the policy's (e.g. real ones, to score the dream against reality). Returns features (B, H + 1, D) of
        frames 0..H (0 = the last context frame), actions (B, H, dims), rewards and continues (B, H) of frames
        1..H, latents (B, H, N, Dl)."""
        with autocast(latents.device):
            b, c = latents.shape[:2]
            noise = lambda n: torch.randn(b, n, *latents.shape[2:], device=latents.device, generator=generator)  # noqa
            cache = KVCache(self.window)
            features = [self.dynamics.observe(cache, latents, actions, noise(c), agent=True)[:, -1].float()]
            chosen, frames = [], []
            for t in range(horizon):
                action = (replay[:, t:t + 1] if replay is not None else
                          sample_actions(self.heads.policy_logits(features[-1], distance=0), generator)[:, None])
                z = self.dynamics.denoise(cache, action, noise(1), steps, agent=True)
                features.append(self.dynamics.observe(cache, z, action, noise(1), agent=True)[:, 0].float())
                chosen.append(action[:, 0])
                frames.append(z)
            features = torch.stack(features, dim=1)
            return dict(features=features, actions=torch.stack(chosen, dim=1), latents=torch.cat(frames, dim=1),
                        rewards=self.heads.predicted_reward(features[:, 1:]),
                        continues=self.heads.predicted_continue(features[:, 1:]))

    @torch.no_grad()
    def prior_nll(self, latents, actions):
        """How well the behaviour-cloned prior predicts the next action on real windows (latents (B, T, N, Dl),
        actions (B, T, dims), row t holding a_{t-1}): the negative log-likelihood (nats, summed over action
        dimensions) of a_t at distance 0, per frame t < T - 1, and the targets a_t and previous actions a_{t-1}
        (B, T - 1, dims) for comparing with evaluate.action_baseline_nll (-1 where there is none)."""
        logits = self.heads.policy_logits(self.features(latents, actions)[:, :-1], prior=True, distance=0)
        targets = actions[:, 1:]
        return -log_prob(logits, targets.clamp_min(0)), targets, actions[:, :-1]

    def finetune_trainer(self, cfg, device):
        """The finetuning optimizer of the whole agent (Eq. 9), its likelihood terms' RMS floored at loss_floor."""
        return Trainer(self, cfg, device, total_steps=cfg.finetune_steps,
                       loss_floors={name: cfg.loss_floor for name in ("bc", "reward", "continuation")})

    def imagination_trainer(self, cfg, device):
        """The optimizer of imagination training: the policy and value heads only, at a constant policy_lr (no
        warm-up, no decay)."""
        return Trainer(nn.ModuleList([self.heads.policy, self.heads.value]),
                       dataclasses.replace(cfg, lr=cfg.policy_lr, warmup_steps=1, cooldown=0.0), device)

    def imagination_loss(self, rollout):
        """Value loss (two-hot cross-entropy to sg(R_t)) and PMPO (Eq. 11) on an imagined rollout; the features
        are fixed, so only the policy and value heads learn. No return or advantage normalization, no entropy.
        Also returns diagnostics (not optimized): the fraction of advantages >= 0 and their mean, the share of the
        returns' variance the values explain, the policy's entropy (nats, summed over action dimensions) and its KL
        to the prior."""
        features = rollout["features"]
        value_logits = self.heads.value(features)
        values = two_hot_decode(value_logits, self.heads.support).detach()
        returns = lambda_returns(rollout["rewards"], rollout["continues"], values, self.discount, self.lam)
        value = two_hot_loss(value_logits[:, :-1], returns, self.heads.support).mean()
        advantages = returns - values[:, :-1]
        logits = self.heads.policy_logits(features[:, :-1], distance=0)
        logp = log_prob(logits, rollout["actions"])
        positive, negative = (advantages >= 0).float(), (advantages < 0).float()
        pmpo = ((1 - self.alpha) * (logp * negative).sum() / negative.sum().clamp_min(1)
                - self.alpha * (logp * positive).sum() / positive.sum().clamp_min(1))
        prior = [l.detach() for l in self.heads.policy_logits(features[:, :-1], prior=True, distance=0)]
        kl = kl_divergence(logits, prior).mean()
        entropy = -sum((l.float().softmax(-1) * l.float().log_softmax(-1)).sum(-1) for l in logits).mean()
        explained = 1 - (returns - values[:, :-1]).var() / returns.var().clamp_min(1e-8)
        diagnostics = dict(advantage_positive=positive.mean(), advantage_mean=advantages.mean(),
                           value_explained_variance=explained, policy_entropy=entropy, prior_kl=kl)
        return {"policy": pmpo + self.beta * kl, "value": value}, diagnostics


class AgentPolicy:
    """Acts in a real env (SPEC Sec. 4): each step the tokenizer encodes the newest frame (with the frames before
    it in its training window as context), the dynamics adds it with the previous action to a KV cache (one
    frame of compute) and the policy head samples from the frame's agent token (greedy: takes each dimension's most
    likely bin). For play_episodes: reset(N), then uint8 frames (N, H, W, 3) -> bin indices (N, dims). prior=True
    acts with the frozen BC policy; with an explorer (e.g. RandomExplorer), each stream acts with it instead with
    probability explore_prob."""

    def __init__(self, agent, tokenizer, tokenizer_window, device, prior=False, seed=0, explorer=None,
                 explore_prob=0.0, greedy=False):
        self.agent, self.tokenizer, self.window, self.device = agent, tokenizer, tokenizer_window, device
        self.prior, self.explorer, self.explore_prob, self.greedy = prior, explorer, explore_prob, greedy
        self.generator = torch.Generator(device).manual_seed(seed)
        self.rng = np.random.default_rng(seed)

    def reset(self, num_streams):
        self.cache, self.history = KVCache(self.agent.window), []
        self.frame_cache = KVCache(self.window - 1) if self.tokenizer.streams_exactly else None
        self.previous = torch.full((num_streams, 1, len(self.agent.heads.action_bins)), -1, device=self.device)
        if self.explorer is not None:
            self.explorer.reset(num_streams)

    @torch.no_grad()
    def __call__(self, frames):
        with autocast(self.device):
            if self.frame_cache is not None:   # one frame of compute (Tokenizer.streams_exactly)
                z = self.tokenizer.encode(frames_to_tensor(frames[:, None], self.device), cache=self.frame_cache)
            else:
                self.history = (self.history + [frames])[-self.window:]
                z = self.tokenizer.encode(frames_to_tensor(np.stack(self.history, axis=1), self.device))[:, -1:]
            z = z.float()
            noise = torch.randn(z.shape, device=self.device, generator=self.generator)
            features = self.agent.dynamics.observe(self.cache, z, self.previous, noise, agent=True)[:, 0]
        logits = self.agent.heads.policy_logits(features, prior=self.prior, distance=0)
        if self.greedy:
            action = torch.stack([l.argmax(-1) for l in logits], dim=-1).cpu().numpy()
        else:
            action = sample_actions(logits, self.generator).cpu().numpy()
        if self.explorer is not None:
            explored = self.explorer(frames)   # keeps its own action holding going
            action = np.where(self.rng.random((len(action), 1)) < self.explore_prob, explored, action)
        self.previous = torch.from_numpy(action).to(self.device)[:, None]   # what was done leads to the next frame
        return action


# ==================================================================================================================
# 7. Environments, action binning, online collection and the episode dataset
#    Episodes are stored frame-aligned (SPEC Sec. 3, ours): row t holds frame o_t, the action a_{t-1} that led to
#    it (zeros at t = 0, marked by `first`), the reward r_t received on arriving at o_t, and whether o_t is
#    terminal / truncated.
# ==================================================================================================================
class ResetNoops(gym.Wrapper):
    """Steps `count` no-op (all-zero) actions after reset, e.g. past CarRacing's zoom-in animation; only the last
    is drawn where the env allows (see draws_each_step). They are steps of the env's episode: they count toward its
    time limit, and their summed reward is info["reset_reward"] (part of the episode's return)."""

    def __init__(self, env, count):
        super().__init__(env)
        self.count, self.skip_drawing = count, draws_each_step(env)

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        noop = np.zeros(self.action_space.shape, self.action_space.dtype)
        total = 0.0
        for i in range(self.count):
            draw = not self.skip_drawing or i == self.count - 1
            obs, reward, _, _, info = step_drawing(self.env, noop, draw)
            total = total + reward
        return obs, {**info, "reset_reward": total}


class RepeatAction(gym.Wrapper):
    """Repeats each action `repeat` times, summing the rewards, stopping early at an episode end. Only the frame
    it returns is drawn where the env allows (see draws_each_step)."""

    def __init__(self, env, repeat):
        super().__init__(env)
        self.repeat, self.skip_drawing = repeat, draws_each_step(env)

    def step(self, action):
        total = 0.0
        for i in range(self.repeat):
            draw = not self.skip_drawing or i == self.repeat - 1
            obs, reward, terminated, truncated, info = step_drawing(self.env, action, draw)
            total = total + reward
            if np.all(terminated) or truncated:
                obs = obs if draw else redraw(self.env)
                break
        return obs, total, terminated, truncated, info


def draws_each_step(env):
    """Whether env is gymnasium's CarRacing under wrappers that pass its frames on unchanged. Its step draws the
    frame it returns, most of a step's time on a CPU, and action repeats and reset no-ops throw most frames away.
    Drawing only reads the car and the track, so skipping the unused ones leaves every kept frame as it was
    (tests/test_data.py compares both ways). Not in "human" render mode, which shows every frame."""
    base = env.unwrapped
    if type(base).__module__ != "gymnasium.envs.box2d.car_racing" or base.render_mode == "human":
        return False
    return not any(isinstance(wrapper, gym.ObservationWrapper) for wrapper in wrapper_chain(env))


def wrapper_chain(env):
    """env and every wrapper under it, outermost first, down to the unwrapped env."""
    while env is not env.unwrapped:
        yield env
        env = env.env
    yield env


def step_drawing(env, action, draw=True):
    """env.step; with draw=False (only where draws_each_step) the frame is not drawn and the previous one is
    returned in its place, until redraw(env)."""
    if draw:
        return env.step(action)
    base = env.unwrapped

    def skip(mode):   # called where the step draws: keep the score the frame would show (see redraw)
        base.undrawn_score = base.reward
        return base.state.copy()

    base._render = skip   # an instance attribute hides the method for this one step
    try:
        return env.step(action)
    finally:
        del base._render


def redraw(env):
    """Draws the frame that the last step, stepped with draw=False, skipped, and returns it. The step draws before
    charging its time penalty to the score printed on the frame, so that score is put back while drawing."""
    base = env.unwrapped
    score, base.reward = base.reward, base.undrawn_score
    try:
        base.state = base._render("state_pixels")
    finally:
        base.reward = score
    return base.state


class ResizeFrames(gym.ObservationWrapper):
    """Resizes uint8 frames (..., H, W, 3) to size x size with cv2.INTER_AREA."""

    def __init__(self, env, size):
        super().__init__(env)
        self.size = size
        shape = (*env.observation_space.shape[:-3], size, size, 3)
        self.observation_space = gym.spaces.Box(0, 255, shape, np.uint8)

    def observation(self, obs):
        import cv2

        flat = obs.reshape(-1, *obs.shape[-3:])
        resized = [cv2.resize(frame, (self.size, self.size), interpolation=cv2.INTER_AREA) for frame in flat]
        return np.stack(resized).reshape(self.observation_space.shape)


class StreamsAsInfo(gym.Wrapper):
    """For envs with several agents (observations (N, H, W, 3), e.g. MultiCarRacing-v0): gymnasium's vector envs
    need scalar rewards and flags, so the per-agent ones move to info["stream_reward"] and
    info["stream_terminated"], and the episode ends when every agent is terminated (or at truncation)."""

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        info = {**info, "stream_reward": np.asarray(reward, np.float32), "stream_terminated": np.asarray(terminated)}
        return obs, float(np.sum(reward)), bool(np.all(terminated)), bool(truncated), info


class CheckedEnv(gym.Wrapper):
    """Raises a one-line ConfigError naming the env when it returns a non-finite reward or a frame that is not
    the uint8 array of the shape its observation space declares, instead of a crash deep in the model."""

    def check(self, obs, reward=0.0):
        space, env = self.observation_space, self.spec.id if self.spec else self.unwrapped
        if not (isinstance(obs, np.ndarray) and obs.dtype == np.uint8 and obs.shape == space.shape):
            got = f"{obs.dtype} {obs.shape}" if isinstance(obs, np.ndarray) else type(obs).__name__
            raise ConfigError(f"environment '{env}' returned a frame of {got}, not the uint8 {space.shape} its "
                              "observation space declares")
        if not np.all(np.isfinite(reward)):
            raise ConfigError(f"environment '{env}' returned the reward {reward}; rewards must be finite")

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self.check(obs)
        return obs, info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.check(obs, reward)
        return obs, reward, terminated, truncated, info


def make_env(cfg, render_mode=None):
    """A gymnasium env by id with uint8 pixel observations of image_size x image_size (cv2.INTER_AREA).
    Multi-agent envs (observations (N, H, W, 3)) keep the leading agent axis; see StreamsAsInfo."""
    from gymnasium.wrappers import AddRenderObservation

    if cfg.env.startswith("MultiCarRacing"):
        import multi_car_racing  # noqa: F401  (registers MultiCarRacing-v0)
    limit, kwargs = cfg.max_episode_steps or None, env_kwargs(cfg)

    def make(mode):
        try:
            return gym.make(cfg.env, max_episode_steps=limit, render_mode=mode, **kwargs)
        except gym.error.Error as e:
            raise ConfigError(f"cannot make environment '{cfg.env}': {e}") from None
        except (TypeError, ValueError, AssertionError) as e:   # what envs raise for keywords they do not take
            raise ConfigError(f"environment '{cfg.env}' rejects --env-kwargs {cfg.env_kwargs}: {e}") from None
    env = make(render_mode)
    space = env.observation_space
    if not (isinstance(space, gym.spaces.Box) and space.dtype == np.uint8 and space.shape[-1:] == (3,)):
        env.close()   # not an image: observe the rendered frame instead
        env = AddRenderObservation(make("rgb_array"), render_only=True)
    env = CheckedEnv(env)
    if "CarRacing" in cfg.env and cfg.zoom_skip > 0:
        env = ResetNoops(env, cfg.zoom_skip)
    if cfg.action_repeat > 1:
        env = RepeatAction(env, cfg.action_repeat)
    if env.observation_space.shape[-3:-1] != (cfg.image_size, cfg.image_size):
        env = ResizeFrames(env, cfg.image_size)
    if len(env.observation_space.shape) == 4:
        env = StreamsAsInfo(env)
    return env


def stream_action_space(action_space, observation_space):
    """The action space of one agent: a multi-agent Box (N, ...) gives its first row's bounds."""
    if len(observation_space.shape) == 4:
        return gym.spaces.Box(action_space.low[0], action_space.high[0], dtype=action_space.dtype)
    return action_space


class ActionBins:
    """Continuous action binning (SPEC Sec. 3). Each Box dimension gets `bins` values evenly spaced over its
    bounds, both ends included, so a round trip is exact up to half a bin; Discrete(n) is one dimension of n
    bins, MultiDiscrete one dimension per entry. Actions are handled as float arrays (..., dims)."""

    def __init__(self, space, bins):
        self.space = space
        if isinstance(space, gym.spaces.Box):
            if not (np.isfinite(space.low).all() and np.isfinite(space.high).all()):
                raise ConfigError("continuous actions need finite bounds to be binned")
            self.low, self.high = space.low.reshape(-1).astype(np.float64), space.high.reshape(-1).astype(np.float64)
            self.bins = [bins] * self.low.size
        elif isinstance(space, gym.spaces.Discrete):
            self.bins = [int(space.n)]
        elif isinstance(space, gym.spaces.MultiDiscrete):
            self.bins = [int(n) for n in space.nvec.reshape(-1)]
        else:
            raise ConfigError(f"unsupported action space {space}")
        self.continuous = isinstance(space, gym.spaces.Box)
        self.dims = len(self.bins)

    def to_bins(self, actions):
        """Actions (..., dims) -> bin indices (..., dims) int64."""
        actions = np.asarray(actions, dtype=np.float64)
        if not self.continuous:
            return np.rint(actions).astype(np.int64)
        fraction = (np.clip(actions, self.low, self.high) - self.low) / (self.high - self.low)
        return np.rint(fraction * (np.array(self.bins) - 1)).astype(np.int64)

    def from_bins(self, indices):
        """Bin indices (..., dims) -> actions (..., dims) float32 (bin values; the index itself if discrete)."""
        indices = np.asarray(indices)
        if not self.continuous:
            return indices.astype(np.float32)
        return (self.low + indices / (np.array(self.bins) - 1) * (self.high - self.low)).astype(np.float32)

    def to_env(self, actions):
        """Actions (N, dims) -> what a vector of N envs accepts."""
        if isinstance(self.space, gym.spaces.Discrete):
            return actions[:, 0].astype(np.int64)
        return actions.reshape(len(actions), *self.space.shape).astype(self.space.dtype)


def env_action_bins(cfg):
    """The ActionBins of one agent of cfg's env."""
    env = make_env(cfg)
    env.close()
    return ActionBins(stream_action_space(env.action_space, env.observation_space), cfg.action_bins)


class RandomExplorer:
    """Exploration for collection (ours): per stream, uniform random bins per action dimension, each action held
    for a uniform 1..max_hold steps, which moves the agent further than independent per-step noise. `rest[i]` is
    the probability that dimension i is held at its bin nearest zero instead (see explore_rest). A policy:
    `reset(num_streams)`, then each call returns bin indices (num_streams, dims)."""

    def __init__(self, bins, rng, max_hold=8, rest=None):
        self.bins, self.rng, self.max_hold = bins, rng, max_hold
        self.rest = np.zeros(bins.dims) if rest is None else np.asarray(rest, np.float64)
        self.rest_bins = bins.to_bins(np.zeros(bins.dims)) if bins.continuous else np.zeros(bins.dims, np.int64)

    def reset(self, num_streams):
        self.indices = np.zeros((num_streams, self.bins.dims), np.int64)
        self.hold = np.zeros(num_streams, np.int64)

    def __call__(self, frames=None):
        renew = self.hold <= 0
        n = renew.sum()
        drawn = self.rng.integers(0, self.bins.bins, size=(n, self.bins.dims))
        self.indices[renew] = np.where(self.rng.random((n, self.bins.dims)) < self.rest, self.rest_bins, drawn)
        self.hold[renew] = self.rng.integers(1, self.max_hold + 1, size=n)
        self.hold -= 1
        return self.indices.copy()


def random_explorer(bins, cfg, seed):
    """The random explorer that collects the data (RandomExplorer with --explore-rest), seeded."""
    return RandomExplorer(bins, np.random.default_rng(seed), rest=explore_rest(cfg, bins.dims))


def explore_rest(cfg, dims):
    """Per-dimension rest probabilities of the random explorer from --explore-rest ('auto': see Config)."""
    if cfg.explore_rest == "auto":
        return [0.0, 0.0, 0.9] if "CarRacing" in cfg.env and dims == 3 else [0.0] * dims
    try:
        rest = [float(p) for p in cfg.explore_rest.split(",")]
    except ValueError:
        rest = []
    if len(rest) != dims or not all(0 <= p <= 1 for p in rest):
        raise ConfigError(f"--explore-rest '{cfg.explore_rest}' must be 'auto' or {dims} comma-separated "
                          "probabilities in [0, 1], one per action dimension")
    return rest


def play_episodes(cfg, policy, episodes, seed, parallel=32, render_mode=None):
    """Plays `episodes` episodes with env seeds seed, seed + 1, ..., up to `parallel` side by side; the policy acts
    for every stream of a batch (each agent of each env) in one call: `policy.reset(N)` at a batch's start, then
    `policy(frames)` with frames uint8 (N, H, W, 3) returns bin indices (N, dims). Yields each episode as a list
    with one dict per agent in the stored format (frames, actions, rewards, terminated, truncated) plus
    `reset_reward`, the reward of the reset no-ops (ResetNoops), which is part of the env's return but not of the
    stored data. An agent's stream ends at its termination, an episode at the env's end."""
    envs = [make_env(cfg, render_mode) for _ in range(max(1, min(parallel, episodes)))]
    space = envs[0].action_space
    multi = len(envs[0].observation_space.shape) == 4
    bins = ActionBins(stream_action_space(space, envs[0].observation_space), cfg.action_bins)
    try:
        for first in range(0, episodes, len(envs)):
            batch = envs[:episodes - first]
            streams, frames = [], []
            for e, env in enumerate(batch):
                obs, info = env.reset(seed=seed + first + e)
                views = obs if multi else obs[None]
                reset_rewards = np.broadcast_to(info.get("reset_reward", 0.0), len(views))
                streams += [dict(frames=[frame], actions=[np.zeros(bins.dims, np.float32)], rewards=[0.0],
                                 terminated=[False], truncated=[False], reset_reward=float(r))
                            for frame, r in zip(views, reset_rewards)]
                frames.append(views)
            frames = np.concatenate(frames)   # (N, H, W, 3), N = envs x agents
            per_env = len(frames) // len(batch)
            policy.reset(len(frames))
            alive, running = np.ones(len(frames), bool), np.ones(len(batch), bool)
            while running.any():
                actions = bins.from_bins(policy(frames))
                for e in np.flatnonzero(running):
                    rows = slice(e * per_env, (e + 1) * per_env)
                    obs, reward, terminated, truncated, info = batch[e].step(
                        actions[rows].reshape(space.shape) if multi else bins.to_env(actions[rows])[0])
                    frames[rows] = obs if multi else obs[None]
                    rewards, ended = ((info["stream_reward"], info["stream_terminated"]) if multi
                                      else ([reward], [terminated]))
                    for j, i in enumerate(range(rows.start, rows.stop)):
                        if alive[i]:
                            row = (frames[i].copy(), actions[i], float(rewards[j]), bool(ended[j]), bool(truncated))
                            for key, value in zip(("frames", "actions", "rewards", "terminated", "truncated"), row):
                                streams[i][key].append(value)
                    alive[rows] &= ~np.asarray(ended, bool)
                    running[e] = not (terminated or truncated)
            for stream in streams:
                stream["truncated"][-1] = not stream["terminated"][-1]   # the env's time limit, or ours
            for e in range(len(batch)):
                yield streams[e * per_env:(e + 1) * per_env]
    finally:
        for env in envs:
            env.close()


def episode_return(stream):
    """The env's return of one agent's episode: every reward, the reset no-ops' included."""
    return stream["reset_reward"] + float(np.sum(stream["rewards"]))


def episode_files(data_dir):
    return sorted(Path(data_dir).glob("episode_*.npz"))


EPISODE_KEYS = ("frames", "actions", "rewards", "terminated", "truncated")


def read_episode(path, keys=EPISODE_KEYS):
    """The arrays of one episode file; a truncated or foreign file is a one-line error naming it."""
    try:
        with np.load(path) as episode:
            arrays = {key: episode[key] for key in keys}
    except Exception as e:   # a truncated zip, a missing array, not an .npz at all
        raise ConfigError(f"{path} is not a readable episode ({type(e).__name__}: {e}); delete it and run "
                          "again") from None
    if len({len(array) for array in arrays.values()}) > 1:
        raise ConfigError(f"{path} holds arrays of different lengths; delete it and run again")
    return arrays


def save_episode(path, episode):
    """Writes one episode (dict of per-frame lists; other keys are not stored) as a compressed .npz, atomically."""
    arrays = {key: np.asarray(episode[key]) for key in EPISODE_KEYS}
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    os.replace(tmp, path)


@contextmanager
def worker_errors():
    """Around calls into an AsyncVectorEnv: a ConfigError raised in a worker (e.g. by CheckedEnv) reaches the user
    as its one line, without gymnasium's copy of the worker's traceback (a warning); any other error keeps it."""
    caught = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            yield
    except ConfigError:
        caught = []
        raise
    finally:
        for w in caught:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def collect_random(cfg, data_dir):
    """Collects cfg.collect_frames frames with the random explorer over gymnasium vector envs (one per CPU core)
    into data_dir, one compressed .npz per episode. Each agent of a multi-agent env is its own stream, stored as
    its own episodes. Episodes still running at the end are saved as truncated. An interrupted collection
    continues where it stopped; a finished one (marker file `complete`) is reused."""
    from tqdm import tqdm

    data_dir = Path(data_dir)
    if (data_dir / "complete").exists():
        return
    data_dir.mkdir(parents=True, exist_ok=True)
    files = episode_files(data_dir)
    have = sum(len(read_episode(f, ("rewards",))["rewards"]) for f in files)
    num_envs = cfg.num_envs or os.cpu_count()
    vector = gym.vector.AsyncVectorEnv if num_envs > 1 else gym.vector.SyncVectorEnv
    with worker_errors():
        envs = vector([lambda: make_env(cfg)] * num_envs, autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)
    per_env = envs.single_observation_space.shape[0] if len(envs.single_observation_space.shape) == 4 else 1
    bins = ActionBins(stream_action_space(envs.single_action_space, envs.single_observation_space), cfg.action_bins)
    explorer = random_explorer(bins, cfg, [cfg.seed, len(files)])
    explorer.reset(num_envs * per_env)
    with worker_errors():
        obs, _ = envs.reset(seed=cfg.seed * 100_000 + len(files))

    def new_episode(frame):
        return dict(frames=[frame], actions=[np.zeros(bins.dims, np.float32)], rewards=[0.0], terminated=[False],
                    truncated=[False])

    frames = obs.reshape(num_envs * per_env, *obs.shape[-3:])
    episodes = [new_episode(frame) for frame in frames]   # one per stream; None once a stream's episode ended
    restarting = np.zeros(num_envs, bool)   # NEXT_STEP autoreset: the step after an episode end returns a reset
    count, collected = len(files), have + len(episodes)
    with tqdm(total=cfg.collect_frames, initial=have, desc="collect", unit="frame") as bar, closing(envs):
        while collected < cfg.collect_frames:
            actions = bins.from_bins(explorer())
            env_actions = bins.to_env(actions).reshape(num_envs, *envs.single_action_space.shape)
            with worker_errors():
                obs, reward, terminated, truncated, info = envs.step(env_actions)
            frames = obs.reshape(num_envs * per_env, *obs.shape[-3:])
            if per_env > 1:   # absent when every env restarts in this step (NEXT_STEP autoreset: reset infos)
                reward = info.get("stream_reward", np.zeros((num_envs, per_env), np.float32))
                terminated = info.get("stream_terminated", np.zeros((num_envs, per_env), bool))
            reward, terminated = reward.reshape(num_envs, per_env), terminated.reshape(num_envs, per_env)
            before = collected
            for e in range(num_envs):
                streams = range(e * per_env, (e + 1) * per_env)
                if restarting[e]:
                    for s in streams:
                        episodes[s] = new_episode(frames[s])
                    restarting[e], collected = False, collected + per_env
                    continue
                for j, s in enumerate(streams):
                    if episodes[s] is None:
                        continue
                    row = (frames[s], actions[s], reward[e, j], terminated[e, j], truncated[e])
                    for key, value in zip(episodes[s], row):
                        episodes[s][key].append(value)
                    collected += 1
                    if terminated[e, j] or truncated[e]:
                        save_episode(data_dir / f"episode_{count:06d}.npz", episodes[s])
                        count, episodes[s] = count + 1, None
                restarting[e] = all(episodes[s] is None for s in streams)
            bar.update(collected - before)
    for episode in episodes:
        if episode is not None and len(episode["rewards"]) > 1:
            episode["truncated"][-1] = True
            save_episode(data_dir / f"episode_{count:06d}.npz", episode)
            count += 1
    (data_dir / "complete").touch()


class EpisodeDataset:
    """Every episode of a run in memory, frame-aligned, frames uint8 in one preallocated (N, H, W, 3) array
    (a 100k-frame 96x96 dataset takes 2.8 GB). Every `holdout_every`-th episode, starting with the first,
    is held out for evaluation. Windows of consecutive frames are sampled within one episode, never across."""

    def __init__(self, data_dir, holdout_every):
        files = episode_files(data_dir)
        if len(files) < 2:
            raise ConfigError(f"{data_dir} holds {len(files)} episodes; at least 2 are needed (one is held out)")
        lengths = np.array([len(read_episode(f, ("rewards",))["rewards"]) for f in files])
        self.starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        self.lengths = lengths
        first = read_episode(files[0])
        frame_shape, action_dims = first["frames"].shape[1:], first["actions"].shape[1]
        del first   # one episode's frames at a time besides the dataset (tests/test_data.py)
        total = int(lengths.sum())
        self.frames = np.empty((total, *frame_shape), np.uint8)
        self.actions = np.empty((total, action_dims), np.float32)
        self.rewards = np.empty(total, np.float32)
        self.terminated = np.empty(total, bool)
        self.truncated = np.empty(total, bool)
        for f, start, length in zip(files, self.starts, lengths):   # one episode decompressed at a time
            episode = read_episode(f)
            if episode["frames"].shape[1:] != frame_shape or episode["actions"].shape[1:] != (action_dims,):
                raise ConfigError(f"{f} does not match the other episodes of {data_dir} (frames "
                                  f"{episode['frames'].shape[1:]}, actions {episode['actions'].shape[1:]}); delete it "
                                  "and run again")
            for key in EPISODE_KEYS:
                getattr(self, key)[start:start + length] = episode[key]
            del episode
        self.first = np.zeros(total, bool)
        self.first[self.starts] = True
        self.split = np.where(np.arange(len(files)) % holdout_every == 0, "eval", "train")
        self._window_starts = {}

    def window_starts(self, split, length, first_episode=0, required=True):
        """All valid first indices of `length`-frame windows inside the episodes of `split`, from the
        `first_episode`-th file on; an error if there are none, unless not `required`."""
        key = (split, length, first_episode)
        if key not in self._window_starts:
            starts = [np.arange(start, start + n - length + 1) for e, (start, n, s) in
                      enumerate(zip(self.starts, self.lengths, self.split))
                      if e >= first_episode and s == split and n >= length]
            self._window_starts[key] = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        if required and not len(self._window_starts[key]):
            raise ConfigError(f"no {split} episode has {length} frames; collect more data or shorten seq_len")
        return self._window_starts[key]

    def sample_index(self, batch, length, split, rng, first_episode=0):
        """Frame indices (B, T) of `batch` random windows (in the episodes from the `first_episode`-th file on),
        for indexing these or any frame-aligned arrays."""
        return rng.choice(self.window_starts(split, length, first_episode), size=batch)[:, None] + np.arange(length)

    def sample(self, batch, length, split, rng):
        """A batch of windows: dict of arrays shaped (B, T, ...); frames stay uint8 (B, T, H, W, 3)."""
        index = self.sample_index(batch, length, split, rng)
        return dict(frames=self.frames[index], actions=self.actions[index], rewards=self.rewards[index],
                    terminated=self.terminated[index], first=self.first[index])


def frames_to_tensor(frames, device):
    """uint8 (B, T, H, W, 3) numpy -> float (B, T, 3, H, W) in [0, 1] on device."""
    return torch.from_numpy(frames).to(device).permute(0, 1, 4, 2, 3).float() / 255


def causal_windows(fn, x, window):
    """Applies a function that is causal in time (the tokenizer's encoder or decoder) so that every frame sees at
    most `window` frames, itself included, as in training: out[:, t] = fn(x[:, t - window + 1:t + 1])[:, -1].
    x (B, T, ...) -> (B, T, ...). Frames t < window come from one pass over the first `window` frames."""
    b, t = x.shape[:2]
    first = fn(x[:, :window])
    if t <= window:
        return first
    index = torch.arange(window, t, device=x.device)[:, None] + torch.arange(1 - window, 1, device=x.device)
    rest = fn(x[:, index].flatten(0, 1))[:, -1].unflatten(0, (b, t - window))
    return torch.cat([first, rest], dim=1)


@torch.no_grad()
def encode_dataset(tokenizer, dataset, window, device, batch=64, first_frame=0):
    """Latents (N - first_frame, N_latent, D_latent) float16 of every frame from first_frame (an episode start)
    on, with a progress bar. Each frame is encoded with the frames before it in its episode as context, at most
    `window` in all (the tokenizer's training length), exactly as when acting (see causal_windows); not in
    non-overlapping windows, whose boundaries make latents jump (docs/results.md). Where the tokenizer streams
    exactly, `batch` episodes at a time go frame by frame through a KV cache (one frame of compute per frame);
    otherwise each frame is re-encoded with its window."""
    from tqdm import tqdm

    total = len(dataset.frames) - first_frame
    latents = np.empty((total, tokenizer.num_latents, tokenizer.to_latent.out_features), np.float16)
    if tokenizer.streams_exactly:
        episodes = sorted((n, start) for start, n in zip(dataset.starts, dataset.lengths) if start >= first_frame)
        with tqdm(total=total, desc="encode", unit="frame") as bar:
            for i in range(0, len(episodes), batch):
                lengths, starts = np.array(episodes[i:i + batch]).T
                cache = KVCache(window - 1)
                for t in range(lengths.max()):   # a shorter episode repeats its last frame, which is not kept
                    index = starts + np.minimum(t, lengths - 1)
                    with autocast(device):
                        z = tokenizer.encode(frames_to_tensor(dataset.frames[index][:, None], device), cache=cache)
                    keep = t < lengths
                    latents[index[keep] - first_frame] = z[:, 0].float().cpu().numpy()[keep]
                    bar.update(keep.sum())
        return latents
    # jobs: (frame indices of one causal pass, how many of its last outputs to keep)
    jobs = []
    for start, n in zip(dataset.starts, dataset.lengths):
        if start >= first_frame:
            jobs.append((start + np.arange(min(n, window)), min(n, window)))   # the episode's first frames
            jobs += [(np.arange(i - window + 1, i + 1), 1) for i in range(start + window, start + n)]
    with tqdm(total=total, desc="encode", unit="frame") as bar:
        for length, keep in sorted({(len(index), keep) for index, keep in jobs}):
            group = [index for index, k in jobs if (len(index), k) == (length, keep)]
            for i in range(0, len(group), batch):
                index = np.stack(group[i:i + batch])
                with autocast(device):
                    z = tokenizer.encode(frames_to_tensor(dataset.frames[index], device))[:, -keep:]
                latents[index[:, -keep:] - first_frame] = z.float().cpu().numpy()
                bar.update(index[:, -keep:].size)
    return latents


def load_tokenizer(run_dir, device):
    """The frozen tokenizer of a run, its config and its training step."""
    state = load_checkpoint(Path(run_dir) / "tokenizer.pt", "run train_mae.py on this --run-dir first")
    tokenizer_cfg = Config(**state["config"])
    tokenizer = Tokenizer(tokenizer_cfg).to(device).eval().requires_grad_(False)
    load_weights(tokenizer, state["model"], Path(run_dir) / "tokenizer.pt")
    return tokenizer, tokenizer_cfg, state["step"]


def world_data(cfg, tokenizer, tokenizer_cfg, tokenizer_step, device):
    """What the dynamics and the agent train on: the run's episodes, the latents of every frame (cached in
    run_dir/latents_<tokenizer step>_causal<window>.npy, tied to those weights; only frames added since are
    encoded), the
    action binning, and every row's action as bin indices (N, dims), -1 where no action led to the frame."""
    run_dir = Path(cfg.run_dir)
    dataset = EpisodeDataset(run_dir / "data", cfg.holdout_every)
    path = run_dir / f"latents_{tokenizer_step}_causal{tokenizer_cfg.seq_len}.npy"
    shape = (tokenizer.num_latents, tokenizer_cfg.latent_dim)
    latents = np.empty((0, *shape), np.float16)
    if path.exists():
        try:
            latents = np.load(path)
        except Exception as e:   # truncated or not a .npy
            raise ConfigError(f"{path} is not a readable latent cache ({type(e).__name__}); delete it (it is encoded "
                              "again from data/)") from None
        if latents.shape[1:] != shape or len(latents) > len(dataset.frames):
            raise ConfigError(f"{path} holds {len(latents)} latents of {latents.shape[1:]} for {len(dataset.frames)} "
                              f"frames of {shape}; delete it (it is encoded again from data/)")
    if len(latents) < len(dataset.frames):
        new = encode_dataset(tokenizer, dataset, tokenizer_cfg.seq_len, device, first_frame=len(latents))
        latents = np.concatenate([latents, new])
        np.save(str(path) + ".tmp.npy", latents)
        Path(str(path) + ".tmp.npy").replace(path)
    bins = env_action_bins(cfg)
    return dataset, latents, bins, np.where(dataset.first[:, None], -1, bins.to_bins(dataset.actions))


def latent_batch(dataset, latents, action_bins, index, device):
    """What the dynamics and agent stages train on, for frame indices (B, T) from EpisodeDataset.sample_index:
    latents (float), actions as bin indices, rewards and terminated flags as tensors on device, and the index."""
    tensor = lambda array: torch.from_numpy(array[index]).to(device)  # noqa: E731
    return dict(latents=tensor(latents).float(), actions=tensor(action_bins), rewards=tensor(dataset.rewards),
                terminated=tensor(dataset.terminated), index=index)


def frames_to_uint8(frames):
    """float (T, 3, H, W) in [0, 1] -> uint8 (T, H, W, 3) numpy."""
    return (frames.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


# ==================================================================================================================
# 8. Checkpoints, metrics and videos
# ==================================================================================================================
def save_checkpoint(path, **state):
    """torch.save to a temporary file, then an atomic rename: an interruption never leaves half a checkpoint."""
    tmp = Path(str(path) + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


CHECKPOINT_KEYS = {"agent.pt": ("model", "finetuner", "imaginer", "progress", "config", "action_bins"),   # the most
                   "dynamics.pt": ("model", "trainer", "step", "config", "action_bins"),           # entries first
                   "tokenizer.pt": ("model", "trainer", "step", "config")}


def checkpoint_kind(state):
    """Which stage's checkpoint (its file name) a loaded file holds, by its entries; None: none of ours."""
    return next((name for name, keys in CHECKPOINT_KEYS.items() if isinstance(state, dict)
                 and set(keys) <= set(state)), None)


def load_checkpoint(path, hint=""):
    """A checkpoint, loaded with weights_only=True (a downloaded one runs no code). A missing, truncated, empty or
    foreign file, or a stage's file holding another stage's checkpoint, is a one-line error naming it. Config fields
    this version does not have (a checkpoint of an older or newer version) are dropped with a warning."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"no checkpoint at {path}" + (f"; {hint}" if hint else ""))
    fix = "delete it (or move it away) and run its stage again, or --resume from another run's copy"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # truncated, empty, not written by torch.save, or holding objects that would run code
        reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path} is not a readable checkpoint ({reason}); {fix}") from None
    kind = checkpoint_kind(state)
    if path.name in CHECKPOINT_KEYS and kind != path.name:
        what = f"a {kind} checkpoint" if kind else "no checkpoint of this pipeline"
        raise ConfigError(f"{path} holds {what}, not a {path.name} checkpoint; {fix}")
    config = state.get("config") if isinstance(state, dict) else None
    known = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(config) - known) if isinstance(config, dict) else []
    if unknown:   # written by another version of this file
        print(f"warning: {path} has config fields this version lacks, ignored: {', '.join(unknown)}", file=sys.stderr)
        state["config"] = {k: v for k, v in config.items() if k in known}
    return state


def load_weights(module, weights, path):
    """module.load_state_dict, with a checkpoint of other model sizes as a one-line error naming the file."""
    try:
        module.load_state_dict(weights)
    except RuntimeError as e:
        detail = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line or "key" in line),
                      str(e).splitlines()[0])
        raise ConfigError(f"{path} was trained with other model sizes than this run's flags ({detail[:160]}); "
                          "resume with the flags it was trained with, or use another --run-dir") from None


def resume_state(cfg, path):
    """A stage's checkpoint with --resume (None without); refuses to start over an existing one."""
    if Path(path).exists() and not cfg.resume:
        raise ConfigError(f"{path} exists; pass --resume to continue it or pick another --run-dir")
    return load_checkpoint(path, "run without --resume to start training") if cfg.resume else None


@contextmanager
def saved_on_exit(save, bar, logger):
    """Runs a training loop; whatever ends it (the last step, Ctrl-C, an error), the checkpoint is saved."""
    try:
        yield
    except KeyboardInterrupt:
        bar.write("interrupted; saving the checkpoint (continue with --resume)")
        raise
    finally:
        save()
        bar.close()
        logger.close()


def random_state(rng, generator=None):
    """The random number generators' states a stage's checkpoint keeps, so that --resume continues exactly as if
    never stopped (on CPU): torch's global one, the stage's numpy Generator and, if any, its torch.Generator."""
    return dict(torch=torch.get_rng_state(), numpy=rng.bit_generator.state,
                **({"generator": generator.get_state()} if generator is not None else {}))


def restore_random_state(state, rng, generator=None):
    torch.set_rng_state(state["torch"])
    rng.bit_generator.state = state["numpy"]
    if generator is not None:
        generator.set_state(state["generator"])


class Stopwatch:
    """A stage's training time in seconds, carried across --resume (`elapsed_s` in its checkpoint and evaluation
    lines; time between the last checkpoint and an interruption is lost)."""

    def __init__(self, state=None):
        self.before, self.start = (state or {}).get("elapsed_s", 0.0), time.perf_counter()

    def __call__(self):
        return self.before + time.perf_counter() - self.start


MAX_SKIPPED_IN_A_ROW = 20   # non-finite updates in a row after which a stage stops


class Trainer:
    """One module's AdamW (linear warm-up, constant, then a linear decay to 0 over the last `cfg.cooldown` of
    every `total_steps` steps: the online loop's iterations repeat the decay), loss normalizer and gradient
    clipping (`loss_floors`, see LossNormalizer); `step` is one training step on the loss terms that `loss_fn`
    returns (bf16 autocast on CUDA). A step whose loss or gradient is not finite is skipped: weights, AdamW
    moments and loss normalizer stay as they were (the learning-rate schedule moves on with the step count); the
    count is `skipped_steps` in the metrics, and MAX_SKIPPED_IN_A_ROW in a row raise TrainingError (the stage's
    loop then saves the checkpoint, whose weights are the last good ones)."""

    def __init__(self, module, cfg, device, total_steps=None, loss_floors=None):
        self.module, self.device, self.grad_clip = module, device, cfg.grad_clip
        self.optimizer = torch.optim.AdamW(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        decay = cfg.cooldown * total_steps if total_steps and cfg.cooldown > 0 else 0

        def factor(step):
            left = (total_steps - step % total_steps) / decay if decay else 1.0
            return min(1.0, (step + 1) / cfg.warmup_steps, left)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        self.normalizer = LossNormalizer(floors=loss_floors)
        self.skipped, self.in_a_row = 0, 0

    def step(self, loss_fn, *args):
        """loss_fn returns its loss terms, or (loss terms, diagnostics): scalars logged alongside, not optimized."""
        with autocast(self.device):
            losses = loss_fn(*args)
        losses, diagnostics = losses if isinstance(losses, tuple) else (losses, {})
        self.optimizer.zero_grad(set_to_none=True)
        finite = all(torch.isfinite(loss).all() for loss in losses.values())
        grad_norm = torch.tensor(float("nan"))
        if finite:
            estimates = dict(self.normalizer.mean_squares)
            self.normalizer(losses).backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
            finite = bool(torch.isfinite(grad_norm))
            if not finite:
                self.normalizer.mean_squares = estimates
        if finite:
            self.optimizer.step()
            self.in_a_row = 0
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped, self.in_a_row = self.skipped + 1, self.in_a_row + 1
            if self.in_a_row >= MAX_SKIPPED_IN_A_ROW:
                raise TrainingError(f"{self.in_a_row} training steps in a row had a non-finite loss or gradient; "
                                    "stopped with the last good weights saved (try a lower --lr or --grad-clip)")
        self.schedule.step()
        return {**{name: value.item() for name, value in {**losses, **diagnostics}.items()},
                "grad_norm": grad_norm.item(), "lr": self.schedule.get_last_lr()[0], "skipped_steps": self.skipped}

    def state_dict(self):
        return dict(optimizer=self.optimizer.state_dict(), schedule=self.schedule.state_dict(),
                    normalizer=self.normalizer.state_dict(), skipped=self.skipped)

    def save(self, path, step, cfg, **extra):
        """The stage's checkpoint: the module, this trainer, the step, the config and any extra entries."""
        save_checkpoint(path, model=self.module.state_dict(), trainer=self.state_dict(), step=step,
                        config=dataclasses.asdict(cfg), **extra)

    def restore(self, state, path):
        """Loads a checkpoint written by `save` (read from `path`) into the module and this trainer; returns its
        step."""
        load_weights(self.module, state["model"], path)
        self.load_state_dict(state["trainer"], path)
        return state["step"]

    def load_state_dict(self, state, path):
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as e:
            raise ConfigError(f"{path}: its optimizer state does not fit this run's model ({e}); resume with the "
                              "flags it was trained with, or use another --run-dir") from None
        self.schedule.load_state_dict(state["schedule"])
        load_weights(self.normalizer, state["normalizer"], path)
        self.skipped = state.get("skipped", 0)


class Logger:
    """Appends one JSON object per line to run_dir/metrics.jsonl ({"stage", "step", metrics...}) and mirrors
    it to wandb unless --wandb disabled (wandb is imported only then)."""

    def __init__(self, cfg, stage):
        self.stage, self.path = stage, Path(cfg.run_dir) / "metrics.jsonl"
        self.wandb = None
        if cfg.wandb != "disabled":
            import wandb

            self.wandb = wandb.init(project="dreamer4-compact", group=Path(cfg.run_dir).name, dir=cfg.run_dir,
                                    name=f"{Path(cfg.run_dir).name}-{stage}", mode=cfg.wandb,
                                    config=dataclasses.asdict(cfg))

    def log(self, step, **metrics):
        with open(self.path, "a") as f:
            f.write(json.dumps({"stage": self.stage, "step": step, **metrics}) + "\n")
        if self.wandb:
            self.wandb.log({f"{self.stage}/{key}": value for key, value in metrics.items()   # scalars only: lists
                            if isinstance(value, (int, float))}, step=step)                # stay in the file
        if os.environ.get("DREAMER4_SIGKILL_AT") == f"{self.stage}:{step}":   # for the resume test: die right here,
            os.kill(os.getpid(), signal.SIGKILL)                             # no cleanup, as a power cut would

    def video(self, step, columns, name=None):
        """Writes run_dir/videos/<name or stage>_<step>.mp4 of the clips side by side (see write_video); returns
        its path."""
        name = name or self.stage
        path = self.path.parent / "videos" / f"{name}_{step:07d}.mp4"
        write_video(path, columns)
        if self.wandb:
            import wandb

            self.wandb.log({f"{self.stage}/{name}_video": wandb.Video(str(path), format="mp4")}, step=step)
        return path

    def close(self):
        if self.wandb:
            self.wandb.finish()


def write_video(path, columns, fps=10):
    """Writes an mp4 of uint8 clips (T, H, W, 3) placed side by side, upscaled (nearest) to >= 128 px tall."""
    import imageio

    frames = np.concatenate(columns, axis=2)
    scale = max(1, math.ceil(128 / frames.shape[1]))
    frames = frames.repeat(scale, axis=1).repeat(scale, axis=2)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    imageio.mimwrite(path, frames, fps=fps, macro_block_size=1)
