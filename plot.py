"""The learning curve of a run: the standard-protocol return of every evaluation train_policy.py logged (mean +-
one standard error over its episodes), against environment steps and against wall-clock time, to a PNG, with
the BC prior's and the random explorer's returns as dashed lines.

    python plot.py --run-dir runs/small --out docs/curve.png

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
    if before_s is None:
        before_s = sum(max((r["elapsed_s"] for r in lines if r["stage"] == stage and "elapsed_s" in r), default=0.0)
                       for stage in ("mae", "dynamics"))
    return dict(env_steps=np.array([r["env_steps"] for r in evals], float),
                hours=np.array([(before_s + r["elapsed_s"]) / 3600 for r in evals]),
                mean=np.array([r["eval_return"] for r in evals]), se=np.array([r["eval_return_se"] for r in evals]),
                baselines={name: (evals[0][f"{name}_return"], evals[0][f"{name}_return_se"])
                           for name in ("bc", "random") if f"{name}_return" in evals[0]})


def nice_ticks(low, high, count=5):
    step = 10 ** np.floor(np.log10(max(high - low, 1e-9) / count))
    step *= min((m for m in (1, 2, 5, 10) if (high - low) / (step * m) <= count), default=10)
    return np.arange(np.ceil(low / step) * step, high + step / 2, step)


def panel(x, data, xlabel, xmax=None):
    """One plot as a uint8 image (HEIGHT, WIDTH, 3)."""
    import cv2

    image = np.full((HEIGHT, WIDTH, 3), 255, np.uint8)
    values = np.concatenate([data["mean"] - data["se"], data["mean"] + data["se"],
                             *[[m - s, m + s] for m, s in data["baselines"].values()]])
    ylow, yhigh = values.min() - 5, values.max() + 5
    xlow, xhigh = 0.0, xmax or x.max() * 1.05
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
    for name, (mean, se) in data["baselines"].items():
        for offset in range(MARGIN, WIDTH - 20, 12):
            cv2.line(image, (offset, py(mean)), (min(offset + 6, WIDTH - 20), py(mean)), COLORS[name], 1)
    points = [(px(a), py(b)) for a, b in zip(x, data["mean"])]
    for (a, b), low, high in zip(points, data["mean"] - data["se"], data["mean"] + data["se"]):
        cv2.line(image, (a, py(low)), (a, py(high)), COLORS["trained"], 1)
        cv2.circle(image, (a, b), 3, COLORS["trained"], -1, cv2.LINE_AA)
    cv2.polylines(image, [np.array(points)], False, COLORS["trained"], 2, cv2.LINE_AA)
    cv2.putText(image, xlabel, (WIDTH // 2 - 60, HEIGHT - 8), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    legend = [("trained policy (mean +- SE)", "trained"), ("BC prior", "bc"), ("random explorer", "random")]
    for i, (text, name) in enumerate(item for item in legend if item[1] == "trained" or item[1] in data["baselines"]):
        cv2.putText(image, text, (MARGIN + 8, 28 + 16 * i), font, 0.4, COLORS[name], 1, cv2.LINE_AA)
    return image


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", required=True, help="a run whose train_policy.py has evaluated at least once")
    parser.add_argument("--out", default=None, help="PNG to write (default RUN_DIR/curve.png)")
    parser.add_argument("--before-s", type=float, default=None,
                        help="seconds the tokenizer and dynamics stages took, where metrics.jsonl lacks them")
    parser.add_argument("--title", default="", help="a line above the plots")
    args = parser.parse_args()
    if args.before_s is not None and args.before_s < 0:
        raise d4.ConfigError("--before-s must be >= 0")
    import cv2

    data = curve(args.run_dir, args.before_s)
    image = np.concatenate([panel(data["env_steps"], data, "environment steps"),
                            panel(data["hours"], data, "wall-clock hours")], axis=1)
    image = np.concatenate([np.full((30, image.shape[1], 3), 255, np.uint8), image])
    cv2.putText(image, args.title or "standard-protocol return", (MARGIN, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                (0, 0, 0), 1, cv2.LINE_AA)
    out = Path(args.out or Path(args.run_dir) / "curve.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out), image)
    print(f"{len(data['mean'])} evaluations -> {out}")


if __name__ == "__main__":
    d4.run_cli(main)
