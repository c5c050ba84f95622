"""MultiCarRacing-v0: several cars racing on one CarRacing track.

Built on top of gymnasium's Box2D ``CarRacing``: the track generator
(``CarRacing._create_track``), the colour scheme and the car physics
(``gymnasium.envs.box2d.car_dynamics.Car``) are reused by subclassing /
calling them.  Everything multi-car specific (contact bookkeeping, shared tile
rewards, start grid, track reversal, the vectorised per-car ego renderer, the
time limit) is implemented here.

See ``multi_car_racing/README.md`` for the rules.
"""

from __future__ import annotations

import colorsys
import math
from typing import Any

import numpy as np

import gymnasium as gym
from gymnasium import spaces
from gymnasium.envs.box2d import car_racing as _cr
from gymnasium.envs.box2d.car_dynamics import SIZE as CAR_SIZE
from gymnasium.envs.box2d.car_dynamics import WHEELPOS, Car
from gymnasium.envs.box2d.car_racing import CarRacing
from gymnasium.utils import EzPickle

import Box2D
import pygame
from Box2D.b2 import contactListener

# Geometry / timing constants shared with CarRacing.
FPS = _cr.FPS
SCALE = _cr.SCALE
ZOOM = _cr.ZOOM
PLAYFIELD = _cr.PLAYFIELD
TRACK_WIDTH = _cr.TRACK_WIDTH  # half width of the road
GRASS_DIM = _cr.GRASS_DIM
WINDOW_W = _cr.WINDOW_W  # CarRacing renders its views in a 1000x800 window ...
WINDOW_H = _cr.WINDOW_H
VIEW = _cr.STATE_W  # ... and squeezes it to 96x96; we render straight at 96*SS.

# Supersampling factor of the ego renderer: views are rasterised at
# (VIEW*SS)^2 and box-filtered down to VIEW^2 (CarRacing rasterises at
# 1000x800 and smooth-scales down; 2x keeps anti-aliased edges at a fraction
# of the cost).
SS = 2
RW = RH = VIEW * SS
# window pixel -> render-surface pixel
AX = RW / WINDOW_W
AY = RH / WINDOW_H

STEP_PENALTY = 0.1
OFF_TRACK_PENALTY = 100.0
MAX_CARS_PER_ROW = 4
ROW_GAP_POINTS = 2  # rows of the start grid are 2 track points (7 units) apart

# Per-car hull colours (car 0 is CarRacing's red).
CAR_COLORS = [
    (204, 0, 0),  # red
    (30, 80, 255),  # blue
    (250, 200, 0),  # yellow
    (160, 0, 210),  # purple
    (255, 120, 0),  # orange
    (0, 200, 210),  # cyan
    (250, 250, 250),  # white
    (255, 0, 170),  # pink
]
WHEEL_COLOR = (0, 0, 0)
WHEEL_STRIPE_COLOR = (77, 77, 77)


def car_color(i: int) -> tuple[int, int, int]:
    """Hull colour of car ``i`` (a fixed palette, then evenly spread hues)."""
    if i < len(CAR_COLORS):
        return CAR_COLORS[i]
    h = (i * 0.618034) % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, 0.9, 0.9)
    return int(r * 255), int(g * 255), int(b * 255)


def _rot(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s], [s, c]])


class _RaceContacts(contactListener):
    """Forwards Box2D contact events to the environment."""

    def __init__(self, env: MultiCarRacing):
        contactListener.__init__(self)
        self.env = env

    def BeginContact(self, contact):
        self.env._contact(contact, True)

    def EndContact(self, contact):
        self.env._contact(contact, False)


class MultiCarRacing(CarRacing):
    """N cars on one procedurally generated CarRacing track.

    Args:
        num_cars: number of cars N (>= 1).
        render_mode: ``None``, ``"rgb_array"`` (the N ego views tiled side by
            side, shape ``(96, 96*N, 3)``) or ``"human"`` (pygame window).
        max_steps: time limit; ``truncated`` becomes True at this step count
            (``None`` or ``0`` disables it).
        randomize_start: randomly permute which car gets which start slot.
        random_direction: drive the track counter-/clockwise at random
            (reverses the tile order and start heading with probability 0.5).
        lap_complete_percent: a car finishes its lap when it re-enters tile 0
            after visiting more than this fraction of tiles (or when it has
            visited every tile).
        domain_randomize: CarRacing's colour randomisation.
        verbose: print track generation messages.

    Observation: ``uint8 (N, 96, 96, 3)`` ego views.  Action: ``float32
    (N, 3)`` rows ``[steer, gas, brake]``.  ``step`` returns
    ``(obs, rewards float32 (N,), terminated bool (N,), truncated bool, info)``.
    """

    metadata = {"render_modes": ["human", "rgb_array"], "render_fps": FPS}

    def __init__(
        self,
        num_cars: int = 2,
        render_mode: str | None = None,
        max_steps: int | None = 1000,
        randomize_start: bool = False,
        random_direction: bool = False,
        lap_complete_percent: float = 0.95,
        domain_randomize: bool = False,
        verbose: bool = False,
    ):
        num_cars = int(num_cars)
        if num_cars < 1:
            raise ValueError(f"num_cars must be >= 1, got {num_cars}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"unsupported render_mode {render_mode!r}")
        super().__init__(
            render_mode=None,
            verbose=verbose,
            lap_complete_percent=lap_complete_percent,
            domain_randomize=domain_randomize,
            continuous=True,
        )
        EzPickle.__init__(
            self,
            num_cars,
            render_mode,
            max_steps,
            randomize_start,
            random_direction,
            lap_complete_percent,
            domain_randomize,
            verbose,
        )
        self.num_cars = num_cars
        self.render_mode = render_mode
        self.max_steps = int(max_steps) if max_steps else None
        self.randomize_start = bool(randomize_start)
        self.random_direction = bool(random_direction)

        n = num_cars
        self.action_space = spaces.Box(
            low=np.tile(np.array([-1.0, 0.0, 0.0], dtype=np.float32), (n, 1)),
            high=np.ones((n, 3), dtype=np.float32),
            dtype=np.float32,
        )
        self.observation_space = spaces.Box(
            low=0, high=255, shape=(n, VIEW, VIEW, 3), dtype=np.uint8
        )
        self.car_colors = [car_color(i) for i in range(n)]

        self.cars: list[Car] = []
        self.road = []
        self.track = []
        self.reversed = False
        self._listener = None
        self._ignore_contacts = False
        self._obs = np.zeros((n, VIEW, VIEW, 3), dtype=np.uint8)
        # render surfaces, kept across steps / resets
        self._surf = pygame.Surface((RW, RH))
        self._small = pygame.Surface((VIEW, VIEW))
        self._font = None
        self._text_cache: dict[str, pygame.Surface] = {}
        self._window = None
        self._window_scale = 4

    # ------------------------------------------------------------------ reset
    def _destroy(self):
        self._ignore_contacts = True
        try:
            for car in self.cars:
                if car.hull is not None:
                    car.destroy()
            for t in self.road or []:
                self.world.DestroyBody(t)
        finally:
            self._ignore_contacts = False
        self.cars = []
        self.road = []

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        gym.Env.reset(self, seed=seed)
        self._destroy()
        # A fresh world per episode: Box2D's internal ordering (proxy ids,
        # contact lists) then only depends on this episode -> bit-identical
        # replays for the same seed and actions.
        self._listener = _RaceContacts(self)
        self.world = Box2D.b2World((0, 0), contactListener=self._listener)

        if self.domain_randomize:
            randomize = True
            if isinstance(options, dict) and "randomize" in options:
                randomize = options["randomize"]
            self._reinit_colors(randomize)

        while True:
            self.road_poly = []
            if self._create_track():
                break
            if self.verbose:
                print("retrying track generation")

        self.reversed = bool(self.random_direction and self.np_random.random() < 0.5)
        if self.reversed:
            self._reverse_track()
        n = self.num_cars
        m = len(self.track)
        if self.randomize_start:
            self.start_slots = self.np_random.permutation(n).astype(np.int64)
        else:
            self.start_slots = np.arange(n, dtype=np.int64)

        self.cars = []
        for i in range(n):
            angle, x, y = self._slot_pose(int(self.start_slots[i]))
            car = Car(self.world, angle, x, y)
            car.hull.color = tuple(c / 255.0 for c in self.car_colors[i])
            car.hull.userData = car.hull
            car.hull.car_id = i
            for w in car.wheels:
                w.car_id = i
            self.cars.append(car)

        self._build_static_geometry()

        # per-episode bookkeeping
        self.num_tiles = m
        self.tile_value = 1000.0 / m
        self.visited = np.zeros((n, m), dtype=bool)
        self.tile_reach_count = np.zeros(m, dtype=np.int64)
        self.done = np.zeros(n, dtype=bool)
        self.lap_finished = np.zeros(n, dtype=bool)
        self.off_playfield = np.zeros(n, dtype=bool)
        self.returns = np.zeros(n, dtype=np.float64)
        self.step_count = 0
        self.t = 0.0
        self._new_visits: list[tuple[int, int]] = []
        self._entered_start = np.zeros(n, dtype=bool)
        self._collisions = np.zeros(n, dtype=np.int64)

        # Settle step without controls (as CarRacing does in reset): cars
        # touch their start tiles; those tile rewards are paid with the first
        # step's reward (as in CarRacing).
        self._carry = self._physics_step()
        self._tile_reward = np.zeros(n)
        for i in range(n):
            self._render_view(i)
        if self.render_mode == "human":
            self.render()
        return self._obs.copy(), self._info()

    def _reverse_track(self):
        """Drive the loop the other way: reverse point order, turn headings by pi.

        Tile ``j`` of the reversed loop lies between reversed points ``j`` and
        ``j-1``, which is the original tile ``(m - j) % m``; tile 0 stays the
        same physical tile (the start line).
        """
        m = len(self.track)
        self.track = [(a, b + math.pi, x, y) for (a, b, x, y) in reversed(self.track)]
        old = list(self.road)
        self.road = [old[(m - j) % m] for j in range(m)]
        for j, t in enumerate(self.road):
            t.idx = j

    def _slot_pose(self, slot: int) -> tuple[float, float, float]:
        """Start pose of grid slot ``slot``: rows of up to 4 cars abreast."""
        n = self.num_cars
        cols = min(n, MAX_CARS_PER_ROW)
        row, col = divmod(slot, cols)
        _, beta, x, y = self.track[(-ROW_GAP_POINTS * row) % len(self.track)]
        lateral = -TRACK_WIDTH + TRACK_WIDTH / cols * (2 * col + 1)
        return beta, x + lateral * math.cos(beta), y + lateral * math.sin(beta)

    def _build_static_geometry(self):
        """Arrays of everything static that is drawn: grass and road polygons."""
        polys, colors = [], []
        grass = tuple(int(c) for c in self.grass_color)
        for gx in range(-20, 20, 2):
            for gy in range(-20, 20, 2):
                x0, y0 = GRASS_DIM * gx, GRASS_DIM * gy
                polys.append(
                    [(x0, y0), (x0 + GRASS_DIM, y0), (x0 + GRASS_DIM, y0 + GRASS_DIM), (x0, y0 + GRASS_DIM)]
                )
                colors.append(grass)
        for poly, color in self.road_poly:
            polys.append([tuple(p) for p in poly])
            colors.append(tuple(int(c) for c in color))
        self._static_polys = np.asarray(polys, dtype=np.float64)  # (P, 4, 2)
        self._static_colors = colors
        self._static_centers = self._static_polys.mean(axis=1)
        self._static_radius = np.sqrt(
            ((self._static_polys - self._static_centers[:, None]) ** 2).sum(-1).max(axis=1)
        )
        self._car_geom_t = None
        b = PLAYFIELD
        self._field_poly = np.array([(b, b), (b, -b), (-b, -b), (-b, b)], dtype=np.float64)
        self._bg = tuple(int(c) for c in self.bg_color)
        pts = np.array([(p[2], p[3]) for p in self.track])
        self._track_points = pts
        self._tile_centers = 0.5 * (pts + np.roll(pts, 1, axis=0))
        car = self.cars[0]
        self._hull_local = [np.array(f.shape.vertices) for f in car.hull.fixtures]
        self._wheel_local = np.array(car.wheels[0].fixtures[0].shape.vertices)
        self._wheel_half = np.abs(self._wheel_local).max(axis=0)  # (half width, half length)

    # ------------------------------------------------------------------ contacts
    def _contact(self, contact, begin: bool):
        if self._ignore_contacts:
            return
        a = contact.fixtureA.body.userData
        b = contact.fixtureB.body.userData
        if a is None or b is None:
            return
        a_tile = hasattr(a, "road_friction")
        b_tile = hasattr(b, "road_friction")
        if a_tile != b_tile:
            tile, part = (a, b) if a_tile else (b, a)
            tiles = getattr(part, "tiles", None)
            if tiles is None:  # a hull over a tile: no effect
                return
            if begin:
                tiles.add(tile)
                self._wheel_enters(part.car_id, tile.idx)
            else:
                tiles.discard(tile)
            return
        ia = getattr(a, "car_id", None)
        ib = getattr(b, "car_id", None)
        if begin and ia is not None and ib is not None and ia != ib:
            self._collisions[ia] += 1
            self._collisions[ib] += 1

    def _wheel_enters(self, i: int, idx: int):
        if self.done[i]:
            return
        if not self.visited[i, idx]:
            self.visited[i, idx] = True
            self._new_visits.append((i, idx))
        if idx == 0:
            self._entered_start[i] = True

    # ------------------------------------------------------------------ step
    def _physics_step(self) -> np.ndarray:
        """Advance physics one frame; returns the tile reward of each car."""
        n = self.num_cars
        self._new_visits.clear()
        self._entered_start[:] = False
        self._collisions[:] = 0
        for i, car in enumerate(self.cars):
            if not self.done[i]:
                car.step(1.0 / FPS)
        self.world.Step(1.0 / FPS, 6 * 30, 2 * 30)
        self.t += 1.0 / FPS

        # Tiles first reached in this frame: cars arriving in the same frame
        # share the same rank k (number of cars that reached it earlier).
        reward = np.zeros(n)
        arrivals: dict[int, list[int]] = {}
        for i, idx in self._new_visits:
            arrivals.setdefault(idx, []).append(i)
        for idx, who in arrivals.items():
            k = int(self.tile_reach_count[idx])
            value = self.tile_value * (n - k) / n
            for i in who:
                reward[i] += value
            self.tile_reach_count[idx] += len(who)
        return reward

    def step(self, action):
        if not self.cars:
            raise RuntimeError("call reset() before step()")
        n = self.num_cars
        act = np.asarray(action, dtype=np.float64).reshape(n, 3)
        act = np.clip(act, self.action_space.low, self.action_space.high)
        for i, car in enumerate(self.cars):
            if self.done[i]:
                continue
            car.steer(-act[i, 0])
            car.gas(act[i, 1])
            car.brake(act[i, 2])

        tile_reward = self._physics_step()
        if self._carry is not None:
            tile_reward += self._carry
            self._carry = None
        self.step_count += 1

        rewards = np.zeros(n, dtype=np.float64)
        was_done = self.done.copy()
        for i, car in enumerate(self.cars):
            if was_done[i]:
                tile_reward[i] = 0.0
                continue
            car.fuel_spent = 0.0
            r = tile_reward[i] - STEP_PENALTY
            count = int(self.visited[i].sum())
            if count == self.num_tiles or (
                self._entered_start[i] and count / self.num_tiles > self.lap_complete_percent
            ):
                self.lap_finished[i] = True
                self.done[i] = True
            x, y = car.hull.position
            if abs(x) > PLAYFIELD or abs(y) > PLAYFIELD:
                self.off_playfield[i] = True
                self.done[i] = True
                r = -OFF_TRACK_PENALTY
            rewards[i] = r
        self.returns += rewards
        self._tile_reward = tile_reward

        # Cars that were racing get a new frame (a car terminated now gets its
        # final frame); cars terminated earlier keep their last frame.
        for i in range(n):
            if not was_done[i]:
                self._render_view(i)
        # Retire newly terminated cars: no more physics, contacts or drawing.
        for i in np.flatnonzero(self.done & ~was_done):
            self._retire(int(i))

        truncated = bool(self.max_steps is not None and self.step_count >= self.max_steps)
        if self.render_mode == "human":
            self.render()
        return (
            self._obs.copy(),
            rewards.astype(np.float32),
            self.done.copy(),
            truncated,
            self._info(),
        )

    def _retire(self, i: int):
        car = self.cars[i]
        for body in [car.hull] + car.wheels:
            body.linearVelocity = (0.0, 0.0)
            body.angularVelocity = 0.0
            body.active = False

    def _info(self) -> dict[str, Any]:
        n = self.num_cars
        pos = np.zeros((n, 2), dtype=np.float32)
        vel = np.zeros((n, 2), dtype=np.float32)
        ang = np.zeros(n, dtype=np.float32)
        for i, car in enumerate(self.cars):
            pos[i] = tuple(car.hull.position)
            vel[i] = tuple(car.hull.linearVelocity)
            ang[i] = car.hull.angle
        d = ((pos[:, None, :].astype(np.float64) - self._tile_centers[None]) ** 2).sum(-1)
        return {
            "tiles_visited": self.visited.sum(axis=1).astype(np.int64),
            "num_tiles": int(self.num_tiles),
            "track_position": d.argmin(axis=1).astype(np.int64),
            "lap_progress": (self.visited.sum(axis=1) / self.num_tiles).astype(np.float32),
            "positions": pos,
            "angles": ang,
            "velocities": vel,
            "tile_reward": self._tile_reward.astype(np.float32),
            "car_collisions": self._collisions.copy(),
            "lap_finished": self.lap_finished.copy(),
            "off_playfield": self.off_playfield.copy(),
            "episode_returns": self.returns.astype(np.float32),
            "reversed": bool(self.reversed),
            "start_slots": self.start_slots.copy(),
        }

    # ------------------------------------------------------------------ scripting helpers
    def set_car_pose(self, i: int, x: float, y: float, angle: float, speed: float = 0.0):
        """Teleport car ``i`` (hull and wheels) to ``(x, y, angle)``.

        The car keeps its wheel layout, moves forward with ``speed`` and has
        no spin.  Tile contacts are re-evaluated at the next physics step, so
        the car collects the tiles it lands on.  Meant for tests and scripted
        scenarios.
        """
        car = self.cars[i]
        hull = car.hull
        rel = [
            ((wx * CAR_SIZE, wy * CAR_SIZE), w.angle - hull.angle)
            for (wx, wy), w in zip(WHEELPOS, car.wheels)
        ]
        hull.angle = angle
        hull.position = (x, y)
        fwd = (-math.sin(angle) * speed, math.cos(angle) * speed)
        hull.linearVelocity = fwd
        hull.angularVelocity = 0.0
        for w, (local, dang) in zip(car.wheels, rel):
            w.angle = angle + dang
            w.position = hull.GetWorldPoint(local)
            w.linearVelocity = fwd
            w.angularVelocity = 0.0

    def tile_pose(self, idx: int, lateral: float = 0.0) -> tuple[float, float, float]:
        """``(x, y, heading)`` at the centre of tile ``idx`` (driving direction),
        shifted ``lateral`` units to the right."""
        m = len(self.track)
        _, b1, x1, y1 = self.track[idx % m]
        _, b0, x0, y0 = self.track[(idx - 1) % m]
        x, y = 0.5 * (x0 + x1), 0.5 * (y0 + y1)
        heading = math.atan2(-(x1 - x0), y1 - y0)  # forward is local +y
        return (
            x + lateral * math.cos(heading),
            y + lateral * math.sin(heading),
            heading,
        )

    # ------------------------------------------------------------------ rendering
    def _view_transform(self, i: int, zoom: float):
        """Affine map world -> render-surface pixels for car ``i``'s camera.

        Same camera as CarRacing: rotates with the car, car at the horizontal
        centre and 3/4 of the height, ``zoom`` window pixels per world unit.
        """
        hull = self.cars[i].hull
        a = -hull.angle
        c, s = math.cos(a), math.sin(a)
        A = np.array([[AX * zoom * c, -AX * zoom * s], [-AY * zoom * s, -AY * zoom * c]])
        p = np.array(tuple(hull.position))
        b = np.array([AX * WINDOW_W / 2, AY * WINDOW_H * 3 / 4]) - A @ p
        return A, b

    def _zoom(self) -> float:
        # CarRacing's zoom-in animation over the first simulated second.
        return 0.1 * SCALE * max(1 - self.t, 0) + ZOOM * SCALE * min(self.t, 1)

    def _render_view(self, i: int):
        surf = self._surf
        zoom = self._zoom()
        A, b = self._view_transform(i, zoom)
        draw_polygon = pygame.draw.polygon

        surf.fill((0, 0, 0))
        draw_polygon(surf, self._bg, (self._field_poly @ A.T + b).tolist())

        # static polygons near the camera (world-space circle test), then an
        # exact screen bounding-box test on the few candidates
        # the screen centre is WINDOW_H/4 window pixels ahead of the car
        hull = self.cars[i].hull
        ahead = WINDOW_H / 4 / zoom
        cx = hull.position[0] - ahead * math.sin(hull.angle)
        cy = hull.position[1] + ahead * math.cos(hull.angle)
        view_r = math.hypot(WINDOW_W / 2, WINDOW_H / 2) / zoom
        d = self._static_centers - (cx, cy)
        near = np.flatnonzero(
            np.einsum("ij,ij->i", d, d) <= (self._static_radius + view_r) ** 2
        )
        pts = self._static_polys[near] @ A.T + b
        lo = pts.min(axis=1)
        hi = pts.max(axis=1)
        keep = (hi[:, 0] >= 0) & (lo[:, 0] < RW) & (hi[:, 1] >= 0) & (lo[:, 1] < RH)
        colors = self._static_colors
        for k, poly in zip(near[keep].tolist(), pts[keep].tolist()):
            draw_polygon(surf, colors[k], poly)

        # cars: the others first, the ego car on top
        if self._car_geom_t != self.t:
            self._update_car_geometry()
        for j in self._draw_order(i):
            car_pts, parts = self._car_geom[j]
            flat = (car_pts @ A.T + b).tolist()
            for color, start, stop in parts:
                draw_polygon(surf, color, flat[start:stop])

        self._draw_indicators(i)
        pygame.transform.smoothscale(surf, (VIEW, VIEW), self._small)
        self._obs[i] = np.frombuffer(
            pygame.image.tobytes(self._small, "RGB"), dtype=np.uint8
        ).reshape(VIEW, VIEW, 3)

    def _draw_order(self, i: int) -> list[int]:
        """Cars to draw in car ``i``'s view: others within sight, then ``i``."""
        zoom = self._zoom()
        reach = math.hypot(WINDOW_W / 2, WINDOW_H * 3 / 4) / zoom + 4.0
        ex, ey = self.cars[i].hull.position
        order = []
        for j, car in enumerate(self.cars):
            if j == i or self.done[j]:
                continue
            x, y = car.hull.position
            if math.hypot(x - ex, y - ey) <= reach:
                order.append(j)
        order.append(i)
        return order

    def _update_car_geometry(self):
        """World-space polygons of every car, computed once per frame and
        shared by all views: wheels (black, with a grey stripe that turns
        with the wheel) under the hull (car colour)."""
        hw, hl = self._wheel_half
        geom = []
        for j, car in enumerate(self.cars):
            chunks, parts, n = [], [], 0
            for w in car.wheels:
                R = _rot(w.angle)
                o = np.array(tuple(w.position))
                chunks.append(self._wheel_local @ R.T + o)
                parts.append((WHEEL_COLOR, n, n + 4))
                n += 4
                y1 = self._stripe_end(w.phase)
                y2 = self._stripe_end(w.phase + 1.2)
                if y1 is not None and y2 is not None:
                    stripe = np.array(
                        [(-hw, hl * y1), (hw, hl * y1), (hw, hl * y2), (-hw, hl * y2)]
                    )
                    chunks.append(stripe @ R.T + o)
                    parts.append((WHEEL_STRIPE_COLOR, n, n + 4))
                    n += 4
            R = _rot(car.hull.angle)
            o = np.array(tuple(car.hull.position))
            color = self.car_colors[j]
            for local in self._hull_local:
                chunks.append(local @ R.T + o)
                parts.append((color, n, n + len(local)))
                n += len(local)
            geom.append((np.concatenate(chunks), parts))
        self._car_geom = geom
        self._car_geom_t = self.t

    @staticmethod
    def _stripe_end(phase: float):
        """Visible end (in units of the wheel half length) of a point of the
        wheel's rim at ``phase``; None when both stripe ends are hidden."""
        # A rim point at angle ``phase`` projects to cos(phase) along the
        # wheel; it is on the visible (top) half when sin(phase) <= 0,
        # otherwise it is clamped to the wheel's end.
        if math.sin(phase) > 0 and math.sin(phase + 1.2) > 0:
            return None
        c = math.cos(phase)
        return c if math.sin(phase) <= 0 else math.copysign(1.0, c)

    def _draw_indicators(self, i: int):
        """Bottom bar of car ``i``: speed, 4 wheel speeds, steering, gyro, score.

        Layout in CarRacing window coordinates (1000x800): black bar over the
        bottom 1/8; bars are 1/40 of the width per slot.
        """
        surf = self._surf
        car = self.cars[i]
        W, H = WINDOW_W, WINDOW_H
        u, h = W / 40.0, H / 40.0
        draw_polygon = pygame.draw.polygon

        def box(x0, x1, y0, y1, color):
            draw_polygon(
                surf,
                color,
                [(x0 * AX, y0 * AY), (x1 * AX, y0 * AY), (x1 * AX, y1 * AY), (x0 * AX, y1 * AY)],
            )

        box(0, W, H - 5 * h, H, (0, 0, 0))

        def vbar(slot, value, color):  # grows up from the baseline
            if abs(value) > 1e-4:
                box(slot * u, (slot + 1) * u, H - h - h * value, H - h, color)

        def hbar(slot, value, color):  # grows right (or left) from slot
            if abs(value) > 1e-4:
                box(slot * u, (slot + value) * u, H - 4 * h, H - 2 * h, color)

        vx, vy = car.hull.linearVelocity
        speed = math.hypot(vx, vy)
        vbar(5, 0.02 * speed, (255, 255, 255))
        for k, (slot, color) in enumerate(
            [(7, (0, 0, 255)), (8, (0, 0, 255)), (9, (51, 0, 255)), (10, (51, 0, 255))]
        ):
            vbar(slot, 0.01 * car.wheels[k].omega, color)
        hbar(20, -10.0 * car.wheels[0].joint.angle, (0, 255, 0))
        hbar(30, -0.8 * car.hull.angularVelocity, (255, 0, 0))

        text = self._score_text(f"{self.returns[i]:04.0f}")
        rect = text.get_rect()
        rect.center = (round(60 * AX), round((H - H * 2.5 / 40.0) * AY))
        surf.blit(text, rect)

    def _score_text(self, s: str) -> pygame.Surface:
        surf = self._text_cache.get(s)
        if surf is None:
            if self._font is None:
                pygame.font.init()
                self._font = pygame.font.Font(pygame.font.get_default_font(), max(1, round(42 * AY)))
            glyphs = self._font.render(s, True, (255, 255, 255), (0, 0, 0))
            raw = pygame.Surface(glyphs.get_size())  # 8-bit -> 24/32-bit
            raw.blit(glyphs, (0, 0))
            w, h = raw.get_size()
            surf = pygame.transform.smoothscale(raw, (max(1, round(w * AX / AY)), h))
            if len(self._text_cache) > 4096:
                self._text_cache.clear()
            self._text_cache[s] = surf
        return surf

    def tiled_frame(self) -> np.ndarray:
        """The N current ego views side by side: ``(96, 96*N, 3)`` uint8."""
        return np.concatenate(list(self._obs), axis=1)

    def render(self):
        if self.render_mode is None:
            gym.logger.warn(
                "render() called without a render_mode; pass render_mode='rgb_array' or 'human'"
            )
            return None
        if not self.cars:
            return None
        frame = self.tiled_frame()
        if self.render_mode == "rgb_array":
            return frame
        # human
        k = self._window_scale
        size = (frame.shape[1] * k, frame.shape[0] * k)
        if self._window is None:
            pygame.display.init()
            pygame.display.set_caption("MultiCarRacing")
            self._window = pygame.display.set_mode(size)
            self.clock = pygame.time.Clock()
        pygame.event.pump()
        img = pygame.image.frombuffer(np.ascontiguousarray(frame).tobytes(), frame.shape[1::-1], "RGB")
        self._window.blit(pygame.transform.scale(img, size), (0, 0))
        pygame.display.flip()
        self.clock.tick(self.metadata["render_fps"])
        return None

    def close(self):
        if self._window is not None:
            pygame.display.quit()
            self._window = None
        self.isopen = False
