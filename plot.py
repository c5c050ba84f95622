"""The learning curve of a run: the standard-protocol return of every evaluation train_policy.py logged (mean +-
one standard error over its episodes), against environment steps and against wall-clock time, to a PNG, with
the BC prior's and the random explorer's returns as dashed lines. Several runs (e.g. seeds) go in one figure,
one colour each, named by their directories.

    python plot.py --run-dir runs/small --out docs/curve.png
    python plot.py --run-dir runs/seed0 runs/seed1 --out docs/seeds.png

Environment steps are the run's data (frames x action repeat, reset no-ops left out) when the evaluation ran.
Wall-clock time is the tokenizer's and dynamics' training time (their last elapsed_s in metrics.jsonl, or
--before-s where the run's first stages logged none) plus the policy stage's elapsed_s. Drawn with OpenCV.
"""
import argparse
import json
from pathlib import Path

import numpy as np

import dreamer4 as d4

WIDTH, HEIGHT, MARGIN = 520, 360, 60
COLORS = {"trained": (200, 90, 30), "bc": (60, 160, 60), "random": (40, 40, 200)}   # BGR
RUN_COLORS = [COLORS["trained"], (20, 150, 240), (170, 60, 170), (90, 90, 90), (0, 170, 170),
              (160, 160, 0), (30, 80, 140), (180, 120, 240)]   # one per run


def curve(run_dir, before_s=None):
    """The evaluations of run_dir/metrics.jsonl: dict of arrays env_steps, hours, mean, se, and the baselines'
    (mean, se) as logged at the first evaluation."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise d4.ConfigError(f"no metrics at {path}; train the run first")
    lines = [json.loads(line) for line in open(path)]
    evals = [r for r in lines if r["stage"] == "policy" and "eval_return" in r and "env_steps" in r]
    if not evals:
        raise d4.ConfigError(f"{path} holds no evaluation with env_steps and elapsed_s (train_policy.py logs one per "
                             "iteration)")
    logged = sum(max((r["elapsed_s"] for r in lines if r["stage"] == stage and "elapsed_s" in r), default=0.0)
                 for stage in ("mae", "dynamics"))
    before_s = logged if logged > 0 or before_s is None else before_s   # --before-s only where none were logged
    return dict(env_steps=np.array([r["env_steps"] for r in evals], float),
                hours=np.array([(before_s + r["elapsed_s"]) / 3600 for r in evals]),
                mean=np.array([r["eval_return"] for r in evals]), se=np.array([r["eval_return_se"] for r in evals]),
                baselines={name: (evals[0][f"{name}_return"], evals[0][f"{name}_return_se"])
                           for name in ("bc", "random") if f"{name}_return" in evals[0]})


def nice_ticks(low, high, count=5):
    """At most `count` round values (steps of 1, 2 or 5 times a power of ten) inside [low, high]: a tick past
    high would sit outside the plot and its label run into the next panel."""
    step = 10 ** np.floor(np.log10(max(high - low, 1e-9) / count))
    step *= min((m for m in (1, 2, 5, 10) if (high - low) / (step * m) <= count), default=10)
    ticks = np.arange(np.ceil(low / step) * step, high + step / 2, step)
    return ticks[ticks <= high + step * 1e-9]


def panel(runs, axis, xlabel):
    """One plot as a uint8 image (HEIGHT, WIDTH, 3) of runs, a list of (name, curve); x is each curve's `axis`."""
    import cv2

    image = np.full((HEIGHT, WIDTH, 3), 255, np.uint8)
    values = np.concatenate([v for _, data in runs for v in (data["mean"] - data["se"], data["mean"] + data["se"],
                             *[[m - s, m + s] for m, s in data["baselines"].values()])])
    ylow, yhigh = values.min() - 5, values.max() + 5
    xlow, xhigh = 0.0, max(data[axis].max() for _, data in runs) * 1.05
    px = lambda v: int(MARGIN + (v - xlow) / (xhigh - xlow) * (WIDTH - MARGIN - 20))  # noqa: E731
    py = lambda v: int(HEIGHT - MARGIN + 20 - (v - ylow) / (yhigh - ylow) * (HEIGHT - MARGIN - 10))  # noqa: E731
    font, gray = cv2.FONT_HERSHEY_SIMPLEX, (150, 150, 150)
    for tick in nice_ticks(ylow, yhigh):
        tick = round(tick, 9) + 0.0   # no "-0"
        cv2.line(image, (MARGIN, py(tick)), (WIDTH - 20, py(tick)), (230, 230, 230), 1)
        cv2.putText(image, f"{tick:g}", (5, py(tick) + 4), font, 0.4, gray, 1, cv2.LINE_AA)
    for tick in nice_ticks(xlow, xhigh):
        label = f"{tick / 1000:g}k" if xhigh > 5000 else f"{tick:g}"
        cv2.putText(image, label, (px(tick) - 10, HEIGHT - MARGIN + 38), font, 0.4, gray, 1, cv2.LINE_AA)
    cv2.rectangle(image, (MARGIN, 10), (WIDTH - 20, HEIGHT - MARGIN + 20), gray, 1)
    legend = []
    for k, (run, data) in enumerate(runs):
        color = RUN_COLORS[k % len(RUN_COLORS)]
        for name, (mean, se) in data["baselines"].items():
            for offset in range(MARGIN, WIDTH - 20, 12):
                cv2.line(image, (offset, py(mean)), (min(offset + 6, WIDTH - 20), py(mean)), COLORS[name], 1)
        points = [(px(a), py(b)) for a, b in zip(data[axis], data["mean"])]
        for (a, b), low, high in zip(points, data["mean"] - data["se"], data["mean"] + data["se"]):
            cv2.line(image, (a, py(low)), (a, py(high)), color, 1)
            cv2.circle(image, (a, b), 3, color, -1, cv2.LINE_AA)
        cv2.polylines(image, [np.array(points)], False, color, 2, cv2.LINE_AA)
        legend.append((f"{run} (mean +- SE)" if len(runs) > 1 else "trained policy (mean +- SE)", color))
    cv2.putText(image, xlabel, (WIDTH // 2 - 60, HEIGHT - 8), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    baselines = {name for _, data in runs for name in data["baselines"]}
    legend += [(text, COLORS[name]) for text, name in (("BC prior", "bc"), ("random explorer", "random"))
               if name in baselines]
    for i, (text, color) in enumerate(legend):
        cv2.putText(image, text, (MARGIN + 8, 28 + 16 * i), font, 0.4, color, 1, cv2.LINE_AA)
    return image


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", required=True, nargs="+",
                        help="runs whose train_policy.py has evaluated at least once (several: one curve each)")
    parser.add_argument("--out", default=None, help="PNG to write (default: curve.png in the first run's directory)")
    parser.add_argument("--before-s", type=float, default=None,
                        help="seconds the tokenizer and dynamics stages took, for the runs whose metrics.jsonl "
                             "lacks them (an agent stage run on another run's world model)")
    parser.add_argument("--title", default="", help="a line above the plots")
    args = parser.parse_args()
    if args.before_s is not None and args.before_s < 0:
        raise d4.ConfigError("--before-s must be >= 0")
    import cv2

    runs = [(Path(run_dir).name, curve(run_dir, args.before_s)) for run_dir in args.run_dir]
    image = np.concatenate([panel(runs, "env_steps", "environment steps"), panel(runs, "hours", "wall-clock hours")],
                           axis=1)
    image = np.concatenate([np.full((30, image.shape[1], 3), 255, np.uint8), image])
    cv2.putText(image, args.title or "standard-protocol return", (MARGIN, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                (0, 0, 0), 1, cv2.LINE_AA)
    out = Path(args.out or Path(args.run_dir[0]) / "curve.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out), image)
    print(f"{sum(len(data['mean']) for _, data in runs)} evaluations -> {out}")


if __name__ == "__main__":
    d4.run_cli(main)
