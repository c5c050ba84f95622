"""Quick speed check: ``python -m multi_car_racing.bench [steps]``.

Prints env steps/s (one step = all N cars) for MultiCarRacing-v0 with
N = 1, 2, 4 next to single-car CarRacing-v3, measured in the same process
after the 50-frame zoom-in, with a fixed gas-and-gentle-steering action.
"""

import sys
import time

import numpy as np

import gymnasium as gym

import multi_car_racing  # noqa: F401  (registers MultiCarRacing-v0)


def _time(env, action, steps):
    env.reset(seed=0)
    for _ in range(50):  # zoom-in frames, not timed
        env.step(action)
    t0 = time.perf_counter()
    for _ in range(steps):
        env.step(action)
    return steps / (time.perf_counter() - t0)


def main(steps: int = 200):
    a = np.array([0.05, 0.3, 0.0], dtype=np.float32)
    env = gym.make("CarRacing-v3")
    print(f"CarRacing-v3 (1 car):        {_time(env, a, steps):7.1f} steps/s")
    env.close()
    for n in (1, 2, 4):
        env = gym.make("MultiCarRacing-v0", num_cars=n)
        sps = _time(env, np.tile(a, (n, 1)), steps)
        print(f"MultiCarRacing-v0 N={n}:      {sps:7.1f} steps/s  ({sps * n:7.1f} car-frames/s)")
        env.close()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200)
