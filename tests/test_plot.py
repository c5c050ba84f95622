"""plot.py: the learning curve from metrics.jsonl."""
import json

import cv2
import numpy as np
import pytest

import plot


def write_metrics(run_dir, shift=0.0):
    lines = [dict(stage="mae", step=10, psnr=20.0, elapsed_s=600.0), dict(stage="mae", step=20, mse=0.1),
             dict(stage="dynamics", step=10, rollout_psnr=20.0, elapsed_s=900.0)]
    for i, (mean, steps) in enumerate([(-50.0, 32000), (-20.0, 44000), (10.0, 56000)]):
        lines.append(dict(stage="policy", step=100 * (i + 1), iteration=i, eval_return=mean + shift,
                          eval_return_se=5.0, bc_return=-55.0, bc_return_se=6.0, random_return=-60.0,
                          random_return_se=4.0, env_steps=steps, data_frames=steps // 4, elapsed_s=1800.0 * (i + 1)))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_the_curve_reads_every_evaluation_with_the_earlier_stages_time(tmp_path):
    write_metrics(tmp_path)
    data = plot.curve(tmp_path)
    assert data["env_steps"].tolist() == [32000, 44000, 56000] and data["mean"].tolist() == [-50, -20, 10]
    assert data["hours"] == pytest.approx([(1500 + 1800) / 3600, (1500 + 3600) / 3600, (1500 + 5400) / 3600])
    assert data["baselines"] == {"bc": (-55.0, 6.0), "random": (-60.0, 4.0)}
    assert plot.curve(tmp_path, before_s=0)["hours"][0] == pytest.approx((1500 + 1800) / 3600)   # logged times win
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "metrics.jsonl").write_text("".join(line + "\n" for line in lines if '"policy"' in line))
    assert plot.curve(tmp_path)["hours"][0] == pytest.approx(0.5)   # an agent stage on another run's world model
    assert plot.curve(tmp_path, before_s=900)["hours"][0] == pytest.approx(0.75)


def test_ticks_are_round_values_inside_the_axis_range():
    assert plot.nice_ticks(0.0, 193_200.0).tolist() == [0, 50_000, 100_000, 150_000]   # not 200k past the end
    assert plot.nice_ticks(-72.0, 131.0).tolist() == [-50, 0, 50, 100]
    assert plot.nice_ticks(0.0, 4.0).tolist() == [0, 1, 2, 3, 4]   # the end itself is kept
    for low, high in ((0.0, 3.7), (-93.5, 688.0), (0.0, 1.05e5), (0.2, 0.9)):
        ticks = plot.nice_ticks(low, high)
        assert 2 <= len(ticks) <= 5 and ticks.min() >= low and ticks.max() <= high


def test_plot_writes_a_png_with_both_panels(tmp_path, stage):
    write_metrics(tmp_path)
    result = stage("plot.py", "--run-dir", str(tmp_path), "--out", str(tmp_path / "curve.png"))
    assert result.returncode == 0 and "3 evaluations" in result.stdout
    image = cv2.imread(str(tmp_path / "curve.png"))
    assert image.shape == (plot.HEIGHT + 30, 2 * plot.WIDTH, 3)
    trained = np.all(image == plot.COLORS["trained"], axis=-1)
    assert trained[:, :plot.WIDTH].any() and trained[:, plot.WIDTH:].any()   # the curve is drawn in both panels


def test_several_runs_share_one_figure_one_colour_each(tmp_path, stage):
    for name, shift in (("seed0", 0.0), ("seed1", 60.0)):
        (tmp_path / name).mkdir()
        write_metrics(tmp_path / name, shift)
    result = stage("plot.py", "--run-dir", str(tmp_path / "seed0"), str(tmp_path / "seed1"),
                   "--out", str(tmp_path / "seeds.png"))
    assert result.returncode == 0 and "6 evaluations" in result.stdout
    image = cv2.imread(str(tmp_path / "seeds.png"))
    below_legend = 30 + 28 + 16 * 4   # title, then the legend's four lines: two runs, two baselines
    for color in plot.RUN_COLORS[:2]:
        drawn = np.all(image[below_legend:] == color, axis=-1)
        assert drawn[:, :plot.WIDTH].any() and drawn[:, plot.WIDTH:].any()
    assert not np.all(image == plot.RUN_COLORS[2], axis=-1).any()   # no third curve


def test_a_run_without_evaluations_is_a_one_line_error(tmp_path, stage):
    (tmp_path / "metrics.jsonl").write_text(json.dumps(dict(stage="mae", step=1, mse=0.1)) + "\n")
    result = stage("plot.py", "--run-dir", str(tmp_path))
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "no evaluation" in result.stderr
