"""Any gymnasium env with its keyword arguments; bad flags, corrupt files and numerical faults refused in one line;
exact resume after SIGKILL; determinism (issue 18)."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

import dreamer4 as d4
import run as run_py
import train_policy

REPO = Path(__file__).resolve().parents[1]
DISCRETE = ["--preset", "tiny", "--wandb", "disabled", "--env-kwargs", '{"continuous": false}', "--log-every", "1",
            "--mae-steps", "20", "--dynamics-steps", "20", "--finetune-steps", "6", "--imagination-steps", "6",
            "--save-every", "5", "--eval-episodes", "1", "--eval-max-episode-steps", "20", "--num-envs", "2"]


def run(*args, **env):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def one_line_error(result, expected=2):
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert result.returncode == expected and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def metrics(run_dir):
    return [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl")]


@pytest.fixture(scope="module")
def discrete_run(tmp_path_factory):
    """All three stages at the tiny preset on CarRacing-v3 with discrete actions, uninterrupted, every loss logged
    (run.py, as a user would)."""
    run_dir = tmp_path_factory.mktemp("discrete")
    result = run("run.py", *DISCRETE, "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


# ---------------------------------------------------------------------------------------------------------------
# 1. --env-kwargs
# ---------------------------------------------------------------------------------------------------------------
def test_the_three_stages_run_on_discrete_car_racing_and_keep_its_keywords(discrete_run, stage):
    for name in ("tokenizer.pt", "dynamics.pt", "agent.pt"):
        assert d4.load_checkpoint(discrete_run / name)["config"]["env_kwargs"] == '{"continuous": false}'
    assert d4.load_checkpoint(discrete_run / "agent.pt")["action_bins"] == [5]   # Discrete(5), not 3 x 33 bins
    actions = d4.EpisodeDataset(discrete_run / "data", 2).actions
    assert set(np.unique(actions)) <= set(range(5)) and len(np.unique(actions)) > 1   # the explorer's discrete actions
    assert any("eval_return" in r for r in metrics(discrete_run))
    result = stage("evaluate.py", "--run-dir", str(discrete_run), "--episodes", "1", "--max-episode-steps", "20",
                   "--policies", "trained,random", "--branches", "0")   # a later tool makes the same env
    assert result.returncode == 0, result.stderr


def test_the_three_stages_run_on_an_env_seen_through_its_rendered_frames(tmp_path, stage):
    """Pendulum-v1: a vector observation (the pipeline observes its rendered frames), one continuous action
    dimension, episodes that end only at the time limit, and a keyword argument (gravity)."""
    flags = ["--preset", "tiny", "--wandb", "disabled", "--run-dir", str(tmp_path), "--env", "Pendulum-v1",
             "--env-kwargs", '{"g": 5.0}', "--max-episode-steps", "40", "--collect-frames", "120", "--mae-steps", "4",
             "--dynamics-steps", "4", "--finetune-steps", "2", "--imagination-steps", "2", "--eval-episodes", "1",
             "--eval-max-episode-steps", "12", "--num-envs", "1"]
    for script in ("train_mae.py", "train_dynamics.py", "train_policy.py"):
        result = stage(script, *flags)
        assert result.returncode == 0, result.stderr[-3000:]
    state = d4.load_checkpoint(tmp_path / "agent.pt")
    assert state["config"]["env_kwargs"] == '{"g": 5.0}' and state["action_bins"] == [33]
    assert d4.make_env(d4.Config(**state["config"])).unwrapped.g == 5.0
    frames = d4.EpisodeDataset(tmp_path / "data", 2).frames
    assert frames.shape[1:] == (32, 32, 3) and frames.std() > 0


def test_env_kwargs_reach_gymnasium_make_and_bad_ones_are_one_line_errors(tiny_cfg):
    env = d4.make_env(dataclasses.replace(tiny_cfg, env_kwargs='{"continuous": false}'))
    assert env.action_space == gym.spaces.Discrete(5)
    env.close()
    for text, expected in (("{continuous: false}", "not valid JSON"), ("[1, 2]", "must be a JSON object"),
                           ('{"render_mode": "human"}', "cannot set render_mode")):
        with pytest.raises(d4.ConfigError, match=expected):
            d4.parse_config("mae", "", ["--preset", "tiny", "--env-kwargs", text])
    with pytest.raises(d4.ConfigError, match="rejects --env-kwargs"):
        d4.make_env(dataclasses.replace(tiny_cfg, env_kwargs='{"no_such_keyword": 1}'))


def test_an_env_rejecting_a_keyword_stops_the_stage_in_one_line(tmp_path, stage):
    result = stage("train_mae.py", "--preset", "tiny", "--wandb", "disabled", "--run-dir", str(tmp_path),
                   "--env-kwargs", '{"no_such_keyword": 1}')
    assert "no_such_keyword" in one_line_error(result) and not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------------------------
# 2. Argument ranges
# ---------------------------------------------------------------------------------------------------------------
def test_every_numeric_flag_has_a_range():
    for f in dataclasses.fields(d4.Config):
        if f.type in (int, float):
            assert f.metadata["check"] in d4.CHECKS, f.name


@pytest.mark.parametrize("flags, message", [
    (["--steps", "-5"], "--mae-steps must be >= 1, not -5"),
    (["--explore-prob", "1.5"], "--explore-prob must be in [0, 1], not 1.5"),
    (["--lr", "nan"], "--lr must be > 0, not nan"),
    (["--max-mask-prob", "1"], "--max-mask-prob must be in [0, 1)"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--online-beta", "-0.5"], "--online-beta must be -1 or >= 0, not -0.5"),
    (["--patch-size", "7"], "--patch-size 7 must divide --image-size 32"),
    (["--latent-tokens", "3"], "--latent-tokens 3 must divide --num-latents 4"),
    (["--dyn-kv-heads", "3", "--dyn-heads", "4"], "--dyn-kv-heads 3 must divide --dyn-heads 4"),
    (["--sampling-steps", "3"], "--sampling-steps 3 must divide --max-shortcut-steps 64"),
    (["--max-shortcut-steps", "48"], "--max-shortcut-steps must be a power of 2"),
    (["--tok-dim", "30"], "must be even"),
    (["--agent-seeds", "2", "--iterations", "1", "--pick-round", "2"], "--pick-round 2 is past the last online round"),
    (["--pick-round", "0"], "--pick-round must be >= 1, not 0"),
])
def test_an_out_of_range_flag_is_one_line_naming_it_and_its_range(flags, message):
    with pytest.raises(d4.ConfigError) as error:
        d4.parse_config("mae", "", ["--preset", "tiny", *flags])
    assert message in str(error.value)


@pytest.mark.parametrize("script", ["train_mae.py", "train_dynamics.py", "train_policy.py"])
def test_a_bad_flag_exits_2_before_any_file_is_written(script, tmp_path, stage):
    run_dir = tmp_path / "run"
    result = stage(script, "--preset", "tiny", "--run-dir", str(run_dir), "--steps", "0")
    assert "must be >= 1, not 0" in one_line_error(result) and not run_dir.exists()


def test_agent_seeds_are_run_pys_and_train_policy_refuses_them(tmp_path, stage):
    result = stage("train_policy.py", "--preset", "tiny", "--run-dir", str(tmp_path / "run"), "--agent-seeds", "2",
                   "--iterations", "1", "--pick-round", "1")
    assert "--agent-seeds is run.py's" in one_line_error(result) and not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------------------
# 3. Corrupt or foreign files
# ---------------------------------------------------------------------------------------------------------------
class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch ran_code",))


@pytest.fixture
def copied_run(discrete_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(discrete_run, run_dir, ignore=shutil.ignore_patterns("videos"))
    return run_dir


@pytest.mark.parametrize("damage, message", [
    ("truncated", "is not a readable checkpoint"),
    ("empty", "is not a readable checkpoint"),
    ("code", "is not a readable checkpoint"),
    ("other stage", "holds a dynamics.pt checkpoint, not a tokenizer.pt checkpoint"),
    ("list", "holds no checkpoint of this pipeline"),
])
def test_a_damaged_or_foreign_checkpoint_is_one_line_and_left_alone(damage, message, copied_run, monkeypatch, stage):
    path = copied_run / "tokenizer.pt"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "code":   # weights_only=True: loading a checkpoint never runs code in it
        torch.save({"model": RunsCode()}, path)
    elif damage == "other stage":
        shutil.copy(copied_run / "dynamics.pt", path)
    else:
        torch.save([1, 2, 3], path)
    before = path.read_bytes()
    monkeypatch.chdir(copied_run)
    result = stage("train_dynamics.py", "--preset", "tiny", "--run-dir", str(copied_run), "--resume")
    line = one_line_error(result)
    assert str(path) in line and message in line and ("delete it" in line)
    assert path.read_bytes() == before and not (copied_run / "ran_code").exists()


def test_resuming_with_other_model_sizes_is_one_line_and_left_alone(copied_run, stage):
    before = (copied_run / "tokenizer.pt").read_bytes()
    result = stage("train_mae.py", "--preset", "tiny", "--run-dir", str(copied_run), "--resume", "--tok-dim", "64")
    line = one_line_error(result)
    assert "tokenizer.pt was trained with other model sizes" in line and "size mismatch" in line
    assert (copied_run / "tokenizer.pt").read_bytes() == before


def test_resuming_an_agent_past_the_end_it_is_given_is_one_line_and_left_alone(copied_run):
    """The agent trained 6 + 6 steps; 6 + 3 would end before where it stands (and, unchecked, train on forever:
    hence a subprocess, with run()'s timeout)."""
    before = (copied_run / "agent.pt").read_bytes()
    result = run("train_policy.py", *DISCRETE, "--run-dir", str(copied_run), "--resume", "--imagination-steps", "3")
    assert "has trained 12 steps, past the 9" in one_line_error(result)
    assert (copied_run / "agent.pt").read_bytes() == before


def test_a_dynamics_of_another_tokenizer_is_one_line(copied_run, stage):
    state = torch.load(copied_run / "dynamics.pt", weights_only=True)
    state["config"]["latent_dim"] = 16
    torch.save(state, copied_run / "dynamics.pt")
    (copied_run / "agent.pt").unlink()
    result = stage("train_policy.py", "--preset", "tiny", "--run-dir", str(copied_run))
    assert "another tokenizer's latents" in one_line_error(result)


def test_a_config_field_this_version_lacks_is_dropped_with_a_warning(copied_run, stage):
    """A checkpoint of another version of dreamer4.py, here with a flag this one removed, still loads."""
    state = torch.load(copied_run / "dynamics.pt", weights_only=True)
    state["config"]["removed_flag"] = 4
    torch.save(state, copied_run / "dynamics.pt")
    (copied_run / "agent.pt").unlink()
    result = stage("train_policy.py", "--preset", "tiny", "--run-dir", str(copied_run), "--finetune-steps", "1",
                   "--imagination-steps", "1", "--eval-episodes", "1", "--eval-max-episode-steps", "8",
                   "--branch-contexts", "0")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "dynamics.pt has config fields this version lacks, ignored: removed_flag" in result.stderr
    assert "removed_flag" not in d4.load_checkpoint(copied_run / "dynamics.pt")["config"]


@pytest.mark.parametrize("damage", ["truncated episode", "latents too long", "latents truncated"])
def test_a_damaged_episode_or_latent_cache_is_one_line_naming_it(damage, copied_run, stage):
    if damage == "truncated episode":
        path = d4.episode_files(copied_run / "data")[1]
        path.write_bytes(path.read_bytes()[:200])
    else:
        path = next(copied_run.glob("latents_*.npy"))
        latents = np.load(path)
        if damage == "latents too long":
            np.save(path, np.concatenate([latents, latents[:3]]))
        else:
            path.write_bytes(path.read_bytes()[:100])
    before = path.read_bytes()
    (copied_run / "dynamics.pt").unlink()
    result = stage("train_dynamics.py", "--preset", "tiny", "--run-dir", str(copied_run))
    line = one_line_error(result)
    assert str(path) in line and "delete it" in line
    assert path.read_bytes() == before and not (copied_run / "dynamics.pt").exists()


# ---------------------------------------------------------------------------------------------------------------
# 4. Training health
# ---------------------------------------------------------------------------------------------------------------
def snapshot(trainer):
    return ([p.detach().clone() for p in trainer.module.parameters()],
            {k: v.clone() for k, v in trainer.optimizer.state_dict()["state"][0].items()},
            dict(trainer.normalizer.get_extra_state()))


def test_a_non_finite_loss_or_gradient_skips_the_update_and_is_counted(tiny_cfg):
    module = torch.nn.Linear(3, 1)
    trainer = d4.Trainer(module, tiny_cfg, torch.device("cpu"), total_steps=100)
    x = torch.randn(8, 3)
    good = lambda: {"loss": module(x).pow(2).mean()}  # noqa: E731
    assert trainer.step(good)["skipped_steps"] == 0
    before = snapshot(trainer)
    nan_loss = trainer.step(lambda: {"loss": module(x).mean() * float("nan")})
    nan_gradient = trainer.step(lambda: {"loss": (module.weight - module.weight.detach()).pow(2).sum().sqrt()})
    # the loss is 0, its gradient (d sqrt(u) / du = inf at u = 0) times 0: NaN
    assert nan_loss["skipped_steps"] == 1 and nan_gradient["skipped_steps"] == 2
    after = snapshot(trainer)
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0]))
    assert all(torch.equal(before[1][k], after[1][k]) for k in before[1]) and before[2] == after[2]
    assert trainer.step(good)["skipped_steps"] == 2 and not torch.equal(module.weight, before[0][0])   # learns on
    assert trainer.state_dict()["skipped"] == 2


def test_many_non_finite_steps_in_a_row_stop_the_stage_with_the_last_good_weights(
        discrete_run, tmp_path, monkeypatch, stage):
    runs, results = {}, {}
    for name, steps in (("stopped", "40"), ("good", "5")):
        run_dir = tmp_path / name
        shutil.copytree(discrete_run / "data", run_dir / "data")
        runs[name] = run_dir
        calls = []
        loss = d4.Tokenizer.loss

        def failing(self, frames):   # finite for the first 5 steps, then NaN
            calls.append(1)
            losses = loss(self, frames)
            return losses if len(calls) <= 5 else {k: v * float("nan") for k, v in losses.items()}
        monkeypatch.setattr(d4.Tokenizer, "loss", failing)
        result = stage("train_mae.py", "--preset", "tiny", "--wandb", "disabled", "--run-dir", str(run_dir),
                       "--steps", steps, "--log-every", "1", "--save-every", "1000", "--env-kwargs",
                       '{"continuous": false}')
        results[name] = result
        monkeypatch.undo()
    code, err = results["stopped"].returncode, results["stopped"].stderr
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 1 and len(errors) == 1 and "in a row had a non-finite loss" in errors[0] and "Traceback" not in err
    assert results["good"].returncode == 0
    stopped = torch.load(runs["stopped"] / "tokenizer.pt", weights_only=True)
    good = torch.load(runs["good"] / "tokenizer.pt", weights_only=True)
    limit = d4.MAX_SKIPPED_IN_A_ROW   # the step that reaches it does not complete
    assert stopped["step"] == 5 + limit - 1 and stopped["trainer"]["skipped"] == limit
    assert all(torch.equal(stopped["model"][k], good["model"][k]) for k in good["model"])   # the last good weights
    logged = [(r["step"], r["skipped_steps"]) for r in metrics(runs["stopped"]) if "skipped_steps" in r]
    assert logged[:6] == [(1, 0), (2, 0), (3, 0), (4, 0), (5, 0), (6, 1)] and logged[-1] == (5 + limit - 1, limit - 1)


class FaultyEnv(gym.Env):
    """32x32 frames; at the third step a NaN reward (fault="reward") or a 16x16 frame (fault="frame")."""
    observation_space = gym.spaces.Box(0, 255, (32, 32, 3), np.uint8)
    action_space = gym.spaces.Discrete(2)

    def __init__(self, fault="reward", render_mode=None):
        self.fault, self.t = fault, 0

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros((32, 32, 3), np.uint8), {}

    def step(self, action):
        self.t += 1
        bad = self.t == 3
        frame = np.zeros((16, 16, 3) if bad and self.fault == "frame" else (32, 32, 3), np.uint8)
        return frame, float("nan") if bad and self.fault == "reward" else 0.0, False, False, {}


gym.register("FaultyEnv-v0", entry_point=FaultyEnv, max_episode_steps=50)


@pytest.mark.parametrize("fault, message", [("reward", "returned the reward nan"),
                                            ("frame", "returned a frame of uint8 (16, 16, 3)")])
def test_an_env_returning_a_nan_reward_or_a_wrong_frame_is_one_line_naming_it(
        fault, message, tmp_path, stage):
    result = stage("train_mae.py", "--preset", "tiny", "--wandb", "disabled", "--run-dir", str(tmp_path), "--env",
                   "FaultyEnv-v0", "--env-kwargs", json.dumps({"fault": fault}), "--num-envs", "2")   # in workers
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "FaultyEnv-v0" in lines[0] and message in lines[0]
    assert "Traceback" not in result.stderr and "Worker" not in result.stderr   # nor gymnasium's copy of it


# ---------------------------------------------------------------------------------------------------------------
# 5, 6. Exact resume after SIGKILL; the same seed, the same losses
# ---------------------------------------------------------------------------------------------------------------
def test_a_run_killed_and_resumed_logs_the_losses_of_the_run_never_stopped(discrete_run, tmp_path):
    """Each stage is SIGKILLed between two checkpoints (steps 5 and 10: killed right after step 8 is logged), then
    resumed from the checkpoint of step 5. Every line it logged, before the kill and after the resume, equals the
    uninterrupted run's line for the same stage and step (same seed on CPU: determinism, and exact resume of
    model, optimizer, schedule, normalizer, step and random states)."""
    run_dir = tmp_path / "killed"
    for script, stage in (("train_mae.py", "mae"), ("train_dynamics.py", "dynamics"), ("train_policy.py", "policy")):
        killed = run(script, *DISCRETE, "--run-dir", str(run_dir), DREAMER4_SIGKILL_AT=f"{stage}:8")
        assert killed.returncode == -9, killed.stderr[-2000:]
        resumed = run(script, *DISCRETE, "--run-dir", str(run_dir), "--resume")
        assert resumed.returncode == 0, resumed.stderr[-2000:]
    untimed = lambda lines: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in lines]  # noqa: E731
    key = lambda r: (r["stage"], r["step"], tuple(sorted(r)))  # noqa: E731
    never_stopped = {key(r): r for r in untimed(metrics(discrete_run))}
    lines = untimed(metrics(run_dir))
    for r in lines:
        assert never_stopped[key(r)] == r, r
    for stage in ("mae", "dynamics", "policy"):   # 6, 7, 8 were logged twice: before the kill and after the resume
        steps = [r["step"] for r in lines if r["stage"] == stage and ("mse" in r or "dynamics" in r or "bc" in r
                                                                       or "policy" in r)]
        assert steps[:8] == list(range(1, 9)) and steps[8:11] == [6, 7, 8], (stage, steps)
    for a, b in zip(d4.episode_files(discrete_run / "data"), d4.episode_files(run_dir / "data")):
        assert a.read_bytes() == b.read_bytes()   # the collection too


# ---------------------------------------------------------------------------------------------------------------
# 7. run.py --agent-seeds: candidates side by side, the one whose collection scored more continues
# ---------------------------------------------------------------------------------------------------------------
def test_agent_seeds_run_to_the_pick_round_and_the_best_collecting_one_continues(discrete_run, tmp_path):
    """Two agent stages (seeds 0 and 1) on copies of one world model's data play rounds 0-1 side by side; the one
    whose round-1 policy scored more in the collection after round 1 goes on to round 2, the other stops there.
    RUN itself gets no agent; run again, the finished pipeline trains nothing more."""
    run_dir = tmp_path / "picked"
    shutil.copytree(discrete_run, run_dir, ignore=shutil.ignore_patterns("videos", "agent*.pt"))
    world_model = [r for r in metrics(run_dir) if r["stage"] in ("mae", "dynamics")]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in world_model))
    explorer_episodes = len(d4.episode_files(run_dir / "data"))
    command = ["run.py", *DISCRETE, "--run-dir", str(run_dir), "--resume", "--agent-seeds", "2", "--pick-round", "1",
               "--iterations", "2", "--iteration-episodes", "2", "--eval-max-episode-steps", "60"]
    result = run(*command)
    assert result.returncode == 0, result.stderr[-3000:]
    pick = json.loads((run_dir / "agent_pick.json").read_text())
    lines = {seed: metrics(run_dir / f"agent_seed{seed}") for seed in (0, 1)}
    collected = {seed: [r["collect_return"] for r in rows if r["stage"] == "policy" and r.get("iteration") == 1
                        and "collect_return" in r]
                 for seed, rows in lines.items()}
    assert all(len(c) == 1 for c in collected.values()) and collected[0] != collected[1], collected
    assert pick["seed"] == max(collected, key=collected.get) and pick["round"] == 1
    assert {int(s): r for s, r in pick["collect_return"].items()} == {s: c[0] for s, c in collected.items()}
    other = 1 - pick["seed"]
    assert all(rows[:len(world_model)] == world_model for rows in lines.values())   # plot.py counts its hours
    evaluated = {seed: [r["iteration"] for r in rows if r["stage"] == "policy" and "eval_return" in r]
                 for seed, rows in lines.items()}
    assert evaluated[pick["seed"]] == [0, 1, 2] and evaluated[other] == [0, 1]
    episodes = {seed: len(d4.episode_files(run_dir / f"agent_seed{seed}" / "data")) for seed in (0, 1)}
    assert episodes[pick["seed"]] == explorer_episodes + 6 and episodes[other] == explorer_episodes + 4
    assert not (run_dir / "agent.pt").exists() and f"the agent is in {pick['run_dir']}" in result.stdout
    assert pick["run_dir"] == str(run_dir / f"agent_seed{pick['seed']}")
    again = run(*command)
    assert again.returncode == 0 and metrics(run_dir / f"agent_seed{pick['seed']}") == lines[pick["seed"]]


def test_the_pick_reads_the_last_collection_of_its_round(tmp_path):
    """A collection logged twice (before and after a resume) counts once, the later line; other rounds' do not."""
    rows = [dict(stage="dynamics", step=5, iteration=3, collect_return=99.0),
            dict(stage="policy", step=10, iteration=3, collect_return=-5.0, collect_return_se=1.0),
            dict(stage="policy", step=10, iteration=3, collect_return=-4.0, collect_return_se=1.0),
            dict(stage="policy", step=20, iteration=4, collect_return=50.0, collect_return_se=1.0)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"stage": "policy", "st')   # a line being written
    assert run_py.collected_return(path, 3) == -4.0 and run_py.collected_return(path, 4) == 50.0
    with pytest.raises(d4.ConfigError, match="no collection of round 2"):
        run_py.collected_return(path, 2)


def test_a_candidates_command_line_is_run_pys_with_its_own_directory_and_seed():
    argv = ["--preset", "small", "--run-dir", "R", "--seed=3", "--agent-seeds", "2", "--pick-round=8", "--iterations",
            "16", "--pmpo-beta", "0"]
    assert run_py.candidate_flags(argv, "R/agent_seed4", 4) == ["--preset", "small", "--pmpo-beta", "0", "--run-dir",
                                                                "R/agent_seed4", "--seed", "4"]


# ---------------------------------------------------------------------------------------------------------------
# 8. --hours: online rounds end where the next would not fit
# ---------------------------------------------------------------------------------------------------------------
def test_a_rounds_end_is_the_time_spent_plus_the_last_rounds_and_the_last_collections():
    assert train_policy.round_end_s(3400.0, [100.0, 250.0], 50.0) == 3400 + 150 + 50
    assert train_policy.round_end_s(3400.0, [100.0], 50.0) == 3400 + 100 + 50     # the first round: timed from 0
    assert train_policy.round_end_s(3400.0, None, 50.0) is None                   # a run that kept no round times


def test_hours_end_the_rounds_where_the_next_would_not_fit_and_a_larger_limit_goes_on(copied_run, stage):
    """The agent (round 0 done, 6 + 6 steps) resumed for two online rounds with a limit already spent: no round
    starts, one collection scores round 0's policy (agent_best.pt), and the same command again trains nothing;
    with a limit far off it plays both rounds."""
    def rounds():
        rows = [r for r in metrics(copied_run) if r["stage"] == "policy"]
        return ([r["iteration"] for r in rows if "eval_return" in r],
                [r["iteration"] for r in rows if "collect_return" in r], len(d4.episode_files(copied_run / "data")),
                torch.load(copied_run / "agent.pt", weights_only=True)["progress"]["step"])
    evaluated, collected, episodes, step = rounds()
    assert (evaluated, collected, step) == ([0], [], 12)
    command = ["train_policy.py", *DISCRETE, "--run-dir", str(copied_run), "--resume", "--iterations", "2", "--hours"]
    for _ in range(2):
        result = stage(*command, "1e-6")
        assert result.returncode == 0, result.stderr[-3000:]
        assert "round 1 would end after" in result.stdout and "round 0's policy is the last" in result.stdout
        assert rounds() == ([0], [0], episodes + 1, 12) and (copied_run / "agent_best.pt").exists()
    result = stage(*command, "1000")
    assert result.returncode == 0 and rounds() == ([0, 1, 2], [0, 1, 2], episodes + 3, 36), result.stderr[-3000:]


def test_the_pick_falls_back_to_the_last_round_every_candidate_scored(tmp_path):
    """Candidates that --hours stopped before --pick-round (seed 0 after round 1, seed 1 after round 2): run.py
    picks on round 1, the last both scored, not on each one's last."""
    paths = {seed: tmp_path / f"{seed}.jsonl" for seed in (0, 1)}
    for seed, returns in ((0, [5.0, 3.0]), (1, [1.0, 2.0, 100.0])):
        paths[seed].write_text("".join(json.dumps(dict(stage="policy", step=10 * i, iteration=i, collect_return=r))
                                       + "\n" for i, r in enumerate(returns)))
    assert run_py.best_collecting(paths, 8) == (0, 1, {0: 3.0, 1: 2.0})
    assert run_py.best_collecting(paths, 0) == (0, 0, {0: 5.0, 1: 1.0})
    assert run_py.last_collected(tmp_path / "none.jsonl") == -1
