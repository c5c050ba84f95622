"""Multi-car CarRacing for gymnasium.

``import multi_car_racing`` registers ``MultiCarRacing-v0``::

    import gymnasium as gym, multi_car_racing
    env = gym.make("MultiCarRacing-v0", num_cars=2)
    obs, info = env.reset(seed=0)          # obs: uint8 (2, 96, 96, 3)
    obs, rewards, terminated, truncated, info = env.step(env.action_space.sample())

The time limit is handled by the environment itself (``max_steps``), so the
spec has no ``max_episode_steps`` (no extra ``TimeLimit`` wrapper).  The
passive env checker is disabled in the spec because it warns about the
per-car (array) ``rewards``/``terminated``; pass ``disable_env_checker=False``
to ``gymnasium.make`` to get it anyway (it only warns).
"""

import gymnasium as gym

from multi_car_racing.env import MultiCarRacing, car_color

__all__ = ["MultiCarRacing", "car_color", "ENV_ID"]

ENV_ID = "MultiCarRacing-v0"

if ENV_ID not in gym.registry:
    gym.register(
        id=ENV_ID,
        entry_point="multi_car_racing.env:MultiCarRacing",
        max_episode_steps=None,
        disable_env_checker=True,
        order_enforce=True,
    )
