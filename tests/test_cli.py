"""The stage scripts' common CLI: one-line errors, checkpoints that round-trip, metrics, --help (exact --resume:
tests/test_robustness.py)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import dreamer4 as d4

REPO = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--wandb", "disabled"]


def run(*args):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny tokenizer run of 20 steps."""
    run_dir = tmp_path_factory.mktemp("run")
    result = run("train_mae.py", *TINY, "--run-dir", str(run_dir), "--steps", "20")
    assert result.returncode == 0, result.stderr
    return run_dir, None


def test_metrics_are_json_lines_with_stage_step_and_held_out_psnr(tiny_run):
    run_dir, _ = tiny_run
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert all(r["stage"] == "mae" and isinstance(r["step"], int) for r in records)
    psnrs = [r["psnr"] for r in records if "psnr" in r]
    assert len(psnrs) == 2 and all(0 < p < 60 for p in psnrs)
    assert any("mse" in r for r in records)
    assert (run_dir / "videos" / "mae_0000020.mp4").stat().st_size > 1000


def test_checkpoints_round_trip_exactly(tiny_run, tiny_cfg):
    run_dir, _ = tiny_run
    state = d4.load_checkpoint(run_dir / "tokenizer.pt")
    tokenizer = d4.Tokenizer(d4.Config(**state["config"]))
    tokenizer.load_state_dict(state["model"])
    d4.save_checkpoint(run_dir / "copy.pt", model=tokenizer.state_dict(), step=state["step"])
    copy = d4.load_checkpoint(run_dir / "copy.pt")
    assert copy["step"] == 20 and copy["model"].keys() == state["model"].keys()
    assert all(torch.equal(copy["model"][k], state["model"][k]) for k in state["model"])
    assert state["config"]["preset"] == "tiny" and "exp_avg" in state["trainer"]["optimizer"]["state"][0]


def test_a_finished_run_is_not_overwritten_without_resume(tiny_run, stage):
    run_dir, _ = tiny_run
    result = stage("train_mae.py", *TINY, "--run-dir", str(run_dir))
    assert result.returncode == 2 and "pass --resume" in result.stderr


def one_line_error(result):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_unknown_env_id_is_a_one_line_error(tmp_path, stage):
    line = one_line_error(stage("train_mae.py", *TINY, "--run-dir", str(tmp_path), "--env", "NoSuchEnv-v0"))
    assert "NoSuchEnv-v0" in line


def test_missing_checkpoint_is_a_one_line_error(tmp_path, stage):
    line = one_line_error(stage("train_mae.py", *TINY, "--run-dir", str(tmp_path), "--resume"))
    assert f"no checkpoint at {tmp_path / 'tokenizer.pt'}" in line


def test_help_lists_every_flag_with_the_stage_s_own_flags_first(stage):
    for script, own, steps in (("train_mae.py", "tokenizer", "default 50000; tiny 20; small 1000"),
                               ("train_dynamics.py", "dynamics", "default 100000; tiny 20; small 5000"),
                               ("train_policy.py", "agent", "default 10000; tiny 10; small 300")):
        result = stage(script, "--help")
        assert result.returncode == 0
        text = " ".join(result.stdout.split())
        for name in ["steps", *(f.name for f in d4.dataclasses.fields(d4.Config))]:
            flag = "--" + name.replace("_", "-")
            assert flag in text, (script, flag)
        lines = result.stdout.splitlines()
        groups = [line for line in lines[lines.index("options:") + 1:] if line and not line.startswith(" ")]
        assert groups[0].startswith(own), (script, groups)
        assert steps in text   # the stage's own flags show the default and each preset's value
        assert "tiny (seconds, for tests)" in text and "default 96; tiny 32; small 64" in text
        if script == "train_mae.py":
            assert len(result.stdout) < 6000


def test_train_mae_runs_on_multi_car_racing(tmp_path):
    result = run("train_mae.py", *TINY, "--run-dir", str(tmp_path), "--env", "MultiCarRacing-v0", "--steps", "10",
                 "--num-envs", "2")
    assert result.returncode == 0, result.stderr
    assert len(d4.episode_files(tmp_path / "data")) == 2 * 2   # one episode per car of each of the 2 envs
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in records if "psnr" in r] == [10]


def test_train_dynamics_refuses_a_run_without_a_tokenizer(tmp_path, stage):
    line = one_line_error(stage("train_dynamics.py", *TINY, "--run-dir", str(tmp_path)))
    assert "tokenizer.pt" in line and "train_mae.py" in line


def test_train_dynamics_trains_and_reports_rollouts_against_baselines(tiny_run):
    run_dir, _ = tiny_run
    result = run("train_dynamics.py", *TINY, "--run-dir", str(run_dir), "--steps", "20")
    assert result.returncode == 0, result.stderr
    assert torch.load(run_dir / "dynamics.pt", weights_only=True)["step"] == 20
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    evals = [r for r in records if r["stage"] == "dynamics" and "rollout_psnr" in r]
    assert [r["step"] for r in evals] == [10, 20]
    for key in ("rollout", "copy", "shuffled", "recon"):
        assert len(evals[-1][f"{key}_psnr_h"]) == 3 and 0 < evals[-1][f"{key}_psnr"] < 60
    assert len(evals[-1]["action_effect_h"]) == 3 and evals[-1]["action_effect"] > 0   # shuffled actions move dreams
    assert (run_dir / "latents_20_causal4.npy").exists() and (run_dir / "videos" / "dynamics_0000020.mp4").exists()


def test_train_policy_refuses_a_run_without_dynamics(tiny_run, tmp_path, stage):
    (tmp_path / "tokenizer.pt").write_bytes((tiny_run[0] / "tokenizer.pt").read_bytes())
    line = one_line_error(stage("train_policy.py", *TINY, "--run-dir", str(tmp_path)))
    assert "dynamics.pt" in line and "train_dynamics.py" in line


def test_train_policy_evaluates_resumes_and_improves_online(tiny_run):
    run_dir, _ = tiny_run
    if not (run_dir / "dynamics.pt").exists():
        assert run("train_dynamics.py", *TINY, "--run-dir", str(run_dir)).returncode == 0
    quick = [*TINY, "--run-dir", str(run_dir), "--finetune-steps", "4", "--steps", "4", "--eval-episodes", "2",
             "--max-episode-steps", "30", "--eval-max-episode-steps", "30", "--eval-every", "4"]
    first = run("train_policy.py", *quick)
    assert first.returncode == 0, first.stderr
    episodes = len(d4.episode_files(run_dir / "data"))
    # one online round on top
    second = run("train_policy.py", *quick, "--iterations", "1", "--online-beta", "0.7", "--resume")
    assert second.returncode == 0, second.stderr
    assert len(d4.episode_files(run_dir / "data")) == episodes + 2   # round 1's, then the final policy's score
    assert torch.load(run_dir / "agent.pt", weights_only=True)["progress"]["step"] == 16
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl") if '"policy"' in line]
    keyed = lambda key: [r for r in records if key in r]  # noqa: E731
    assert [r["step"] for r in keyed("eval_return")] == [8, 16] and len(keyed("eval_return_se")) == 2
    evals = keyed("eval_return")   # for learning curves: the data grew by the online round's episode
    assert evals[0]["elapsed_s"] > 0 and evals[1]["env_steps"] > evals[0]["env_steps"] > 0
    assert evals[1]["data_frames"] * 2 == evals[1]["env_steps"]   # action repeat 2
    times = [r["elapsed_s"] for r in records if "phase" in r or "eval_return" in r]   # where a round's time goes
    assert len(times) > 2 and times == sorted(times) and times[-1] > evals[0]["elapsed_s"]
    baselines = [(r["random_return"], r["bc_return"]) for r in keyed("eval_return")]
    assert baselines[0] == baselines[1] and np.isfinite(baselines[0]).all()   # played once, on the same seeds
    for r in keyed("eval_return"):   # paired differences on the same tracks
        assert r["episodes"] == 2 and r["trained_minus_bc"] == pytest.approx(r["eval_return"] - r["bc_return"])
        assert np.mean(r["eval_returns"]) == pytest.approx(r["eval_return"], abs=1e-3)   # per episode, to pair later
    assert keyed("imagined_return") and {r["phase"] for r in keyed("bc")} == {"finetune"}
    # the KL to the prior weighs --pmpo-beta in round 0 and --online-beta once the prior is refit
    assert {(r["step"] > 8, r["kl_weight"]) for r in keyed("kl_weight")} == {(False, 0.3), (True, 0.7)}
    assert [r["step"] for r in keyed("prior_nll")] == [4, 12]   # at each freeze of the prior, with its baselines
    assert all(0 < r[k] < 20 for r in keyed("prior_nll") for k in ("prior_nll", "marginal_nll", "repeat_nll"))
    assert all(-1 <= r[k] <= 1 for r in keyed("prior_nll") for k in ("reward_real_corr", "reward_replay_corr"))
    assert all(0 <= r["advantage_positive"] <= 1 and r["policy_entropy"] > 0 for r in keyed("advantage_positive"))
    assert (run_dir / "videos" / "policy_real_0000016.mp4").exists()
    assert (run_dir / "videos" / "policy_imagined_0000008.mp4").exists()
    # each round's policy is scored by the episodes it collects; agent_best.pt keeps round 0's after its collection,
    # then the last round's unless round 0 beat it by two standard errors (0 here: one episode a round)
    scores = keyed("collect_return")
    assert [r["iteration"] for r in scores] == [0, 1] and all(np.isfinite(r["collect_return"]) for r in scores)
    assert [r["collect_return_se"] for r in scores] == [0, 0]
    best = torch.load(run_dir / "agent_best.pt", weights_only=True)["progress"]["best"]
    kept = scores[0] if scores[0]["collect_return"] > scores[1]["collect_return"] else scores[1]
    assert best == dict(iteration=kept["iteration"], collect_return=kept["collect_return"], collect_return_se=0.0)


def test_evaluate_logs_the_standard_protocol_and_matches_training(tiny_run):
    """evaluate.py on a finished run: the summary line in metrics.jsonl, and for the same policy and seeds the
    numbers train_policy.py logged."""
    run_dir, _ = tiny_run
    if not (run_dir / "agent.pt").exists():
        test_train_policy_evaluates_resumes_and_improves_online(tiny_run)
    trained = [json.loads(line) for line in open(run_dir / "metrics.jsonl") if '"eval_return"' in line][-1]
    result = run("evaluate.py", "--run-dir", str(run_dir), "--episodes", "2", "--max-episode-steps", "30",
                 "--policies", "trained,random,uniform", "--video", "--branches", "2")
    assert result.returncode == 0, result.stderr
    assert "trained minus random" in result.stdout and "trained minus uniform" in result.stdout
    line = json.loads(open(run_dir / "metrics.jsonl").readlines()[-1])
    assert line["stage"] == "evaluate" and line["episodes"] == 2
    assert line["policies"] == ["trained", "random", "uniform"]
    for key in ("eval", "random", "uniform"):
        assert np.isfinite([line[f"{key}_return"], line[f"{key}_return_se"]]).all()
    assert line["trained_minus_random"] == pytest.approx(line["eval_return"] - line["random_return"])
    assert line["eval_return"] == trained["eval_return"] and line["random_return"] == trained["random_return"]
    assert (run_dir / "videos" / "evaluate_trained_0000000.mp4").exists()
    assert "bc_return" not in line and "branch_agreement" in line and "branch_pairs" in line
    # the kept policy plays as it did in its round's evaluation (same weights, same tracks)
    best = torch.load(run_dir / "agent_best.pt", weights_only=True)["progress"]["best"]["iteration"]
    result = run("evaluate.py", "--run-dir", str(run_dir), "--episodes", "2", "--max-episode-steps", "30",
                 "--policies", "trained", "--branches", "0", "--checkpoint", "agent_best.pt")
    assert result.returncode == 0, result.stderr
    line = json.loads(open(run_dir / "metrics.jsonl").readlines()[-1])
    rounds = [json.loads(r) for r in open(run_dir / "metrics.jsonl") if '"eval_return"' in r and '"iteration"' in r]
    assert line["checkpoint"] == "agent_best.pt"
    assert line["eval_return"] == next(r["eval_return"] for r in rounds if r["iteration"] == best)


def test_evaluate_refuses_bad_input_in_one_line(tiny_run, tmp_path, stage):
    assert "agent.pt" in one_line_error(stage("evaluate.py", "--run-dir", str(tmp_path)))
    assert "--policies" in one_line_error(stage("evaluate.py", "--run-dir", str(tiny_run[0]), "--policies", "best"))
    assert "--episodes" in one_line_error(stage("evaluate.py", "--run-dir", str(tiny_run[0]), "--episodes", "0"))
    assert "no agent checkpoint" in one_line_error(stage("evaluate.py", "--run-dir", str(tiny_run[0]),
                                                         "--checkpoint", "tokenizer.pt"))
