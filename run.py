"""All three stages in order, each with the same flags: train_mae.py, train_dynamics.py, train_policy.py.

    python run.py --preset small --run-dir runs/small

Every flag is a stage flag (see python train_mae.py --help) and goes to every stage, except --steps, which means
a different thing in each (use --mae-steps, --dynamics-steps, --imagination-steps). The flags are checked before
anything runs; the pipeline stops at the first stage that fails, with its exit status. With --resume, a stage
whose checkpoint exists continues it (a finished stage trains no further) and one without starts fresh, so the
same command continues an interrupted pipeline. Without --resume, an existing checkpoint stops the pipeline.

With --agent-seeds K above 1 the agent stage starts K times side by side, at agent seeds --seed, --seed + 1, ...,
each in RUN/agent_seed<S> on its own copy of the run so far (data/, tokenizer.pt, dynamics.pt, metrics.jsonl), the
cores shared between them (each one's output in its stage.log). After online round --pick-round the one whose
policy of that round scored most in its collection (the --iteration-episodes episodes that score it and become the
next round's data; not the evaluation's tracks) continues alone to --iterations, and the others stop there.
RUN/agent_pick.json records the choice; the agent's files are in the picked RUN/agent_seed<S>. On the 16-round
recipe one world model's data gave agent seeds that drive and others that stay near zero; where both were run,
round 8's collection was higher for the one that drove (docs/results.md, "What limits learning"). Where --hours
stops the candidates before --pick-round, the pick reads the last round all their collections scored (the picked
one, resumed with the same --hours, stops where it is).
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

import dreamer4 as d4

STAGES = (("train_mae.py", "tokenizer.pt"), ("train_dynamics.py", "dynamics.pt"), ("train_policy.py", "agent.pt"))
HERE = Path(__file__).resolve().parent


def main():
    argv = sys.argv[1:]
    if any(arg == "--steps" or arg.startswith("--steps=") for arg in argv):
        raise d4.ConfigError("--steps differs per stage; give --mae-steps, --dynamics-steps and/or "
                             "--imagination-steps instead")
    cfg = d4.parse_config("mae", __doc__, argv)   # every stage parses the same flags: check them once, up front
    forwarded = [arg for arg in argv if arg not in ("--resume", "--no-resume")]
    for number, (script, checkpoint) in enumerate(STAGES, 1):
        start = time.perf_counter()
        if script == "train_policy.py" and cfg.agent_seeds > 1:
            print(f"stage {number}/3: {script} at agent seeds {cfg.seed}..{cfg.seed + cfg.agent_seeds - 1}",
                  flush=True)
            picked_agent(cfg, forwarded)
        else:
            resume = ["--resume"] if cfg.resume and (Path(cfg.run_dir) / checkpoint).exists() else []
            print(f"stage {number}/3: {' '.join([script, *forwarded, *resume])}", flush=True)
            wait([subprocess.Popen([sys.executable, str(HERE / script), *forwarded, *resume])])
        print(f"stage {number}/3 done in {time.perf_counter() - start:.0f} s", flush=True)


def wait(processes, progress=None):
    """Waits for the stages; on Ctrl-C (which they get too) lets them save their checkpoints. Exits with the
    first failing one's status. `progress`, if given, is called every few seconds while they run."""
    try:
        while any(p.poll() is None for p in processes):
            if progress:
                progress()
            time.sleep(2)
    except KeyboardInterrupt:
        pass
    statuses = [p.wait() for p in processes]
    for status in statuses:
        if status != 0:
            sys.exit(status)


def picked_agent(cfg, forwarded):
    """--agent-seeds: the candidates to --pick-round side by side (resumed where they stopped), the choice, then
    the picked one alone to --iterations."""
    run_dir = Path(cfg.run_dir)
    pick_path = run_dir / "agent_pick.json"
    per_iteration = cfg.finetune_steps + cfg.imagination_steps
    if not pick_path.exists():
        if (run_dir / "agent.pt").exists():
            raise d4.ConfigError(f"{run_dir / 'agent.pt'} exists: --agent-seeds starts new agent stages on the world "
                                 "model's data; use another --run-dir")
        dirs = {seed: candidate_dir(run_dir, seed) for seed in range(cfg.seed, cfg.seed + cfg.agent_seeds)}
        threads = int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1) // len(dirs)
        processes = []
        for seed, directory in dirs.items():
            args = [*candidate_flags(forwarded, directory, seed), "--iterations", str(cfg.pick_round)] + (
                ["--resume"] if (directory / "agent.pt").exists() else [])
            with open(directory / "stage.log", "a") as log:
                processes.append(subprocess.Popen([sys.executable, str(HERE / "train_policy.py"), *args], stdout=log,
                                                  stderr=subprocess.STDOUT,
                                                  env={**os.environ, "OMP_NUM_THREADS": str(max(1, threads))}))
        bar = tqdm(total=len(dirs) * per_iteration * (cfg.pick_round + 1), desc=f"to round {cfg.pick_round}",
                   unit="step")

        def progress():
            bar.n = sum(last_step(directory / "metrics.jsonl") for directory in dirs.values())
            bar.refresh()
        try:
            wait(processes, progress)
        finally:
            bar.close()
        seed, pick_round, returns = best_collecting({s: d / "metrics.jsonl" for s, d in dirs.items()}, cfg.pick_round)
        pick_path.write_text(json.dumps(dict(seed=seed, run_dir=str(dirs[seed]),
                                             round=pick_round, collect_return=returns)) + "\n")
        print(f"round {pick_round}'s collection return, by agent seed: " +
              ", ".join(f"{s} {r:+.2f}" for s, r in returns.items()) + f"; seed {seed} continues", flush=True)
    pick = json.loads(pick_path.read_text())
    args = [*candidate_flags(forwarded, pick["run_dir"], pick["seed"]), "--iterations", str(cfg.iterations),
            "--resume"]
    print(f"agent seed {pick['seed']}: {' '.join(['train_policy.py', *args])}", flush=True)
    wait([subprocess.Popen([sys.executable, str(HERE / "train_policy.py"), *args])])
    print(f"the agent is in {pick['run_dir']}", flush=True)


def candidate_flags(argv, directory, seed):
    """One candidate's command line: run.py's, less --run-dir, --seed, --agent-seeds, --pick-round and
    --iterations, plus its own directory and seed."""
    dropped = ("--run-dir", "--seed", "--agent-seeds", "--pick-round", "--iterations")
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in dropped:
            skip = True   # its value follows
        elif not arg.startswith(tuple(flag + "=" for flag in dropped)):
            kept.append(arg)
    return [*kept, "--run-dir", str(directory), "--seed", str(seed)]


def candidate_dir(run_dir, seed):
    """RUN/agent_seed<S>, with copies of the world model's data/, latent cache, metrics.jsonl (so that plot.py
    counts the world model's hours), tokenizer.pt and dynamics.pt (dynamics.pt last: a copy cut off is made again)."""
    directory = run_dir / f"agent_seed{seed}"
    if not (directory / "dynamics.pt").exists():
        shutil.copytree(run_dir / "data", directory / "data", dirs_exist_ok=True)
        for path in [*run_dir.glob("latents_*.npy"), *run_dir.glob("metrics.jsonl"), run_dir / "tokenizer.pt",
                     run_dir / "dynamics.pt"]:
            shutil.copy2(path, directory / path.name)
    return directory


def policy_rows(path):
    """train_policy.py's metrics.jsonl lines (a line cut off by a running writer is skipped)."""
    rows = []
    if Path(path).exists():
        for line in open(path):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return [row for row in rows if row.get("stage") == "policy"]


def last_step(path):
    rows = policy_rows(path)
    return rows[-1]["step"] if rows else 0


def best_collecting(paths, pick_round):
    """The candidate whose policy scored most in the collection after round `pick_round` (or after the last round
    all of them scored, where --hours stopped them before it). paths: seed -> its metrics.jsonl. Returns the
    seed, the round and each seed's collection return."""
    pick_round = min(pick_round, *(last_collected(path) for path in paths.values()))
    returns = {seed: collected_return(path, pick_round) for seed, path in paths.items()}
    return max(returns, key=returns.get), pick_round, returns


def last_collected(path):
    """The last round whose policy a collection scored (see collected_return); -1 if none."""
    return max((row["iteration"] for row in policy_rows(path) if "collect_return" in row), default=-1)


def collected_return(path, iteration):
    """The mean return of the collection that scored round `iteration`'s policy (train_policy.py's
    `collect_return`), from metrics.jsonl at `path`; of a line logged twice (before and after a resume), the last."""
    returns = [row["collect_return"] for row in policy_rows(path)
               if "collect_return" in row and row.get("iteration") == iteration]
    if not returns:
        raise d4.ConfigError(f"{path} logs no collection of round {iteration}'s policy")
    return returns[-1]


if __name__ == "__main__":
    d4.run_cli(main)
