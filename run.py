"""All three stages in order, each with the same flags: train_mae.py, train_dynamics.py, train_policy.py.

    python run.py --preset small --run-dir runs/small

Every flag is a stage flag (see python train_mae.py --help) and goes to every stage, except --steps, which means
a different thing in each (use --mae-steps, --dynamics-steps, --imagination-steps). The flags are checked before
anything runs; the pipeline stops at the first stage that fails, with its exit status. With --resume, a stage
whose checkpoint exists continues it (a finished stage trains no further) and one without starts fresh, so the
same command continues an interrupted pipeline. Without --resume, an existing checkpoint stops the pipeline.
"""
import subprocess
import sys
import time
from pathlib import Path

import dreamer4 as d4

STAGES = (("train_mae.py", "tokenizer.pt"), ("train_dynamics.py", "dynamics.pt"), ("train_policy.py", "agent.pt"))


def main():
    argv = sys.argv[1:]
    if any(arg == "--steps" or arg.startswith("--steps=") for arg in argv):
        raise d4.ConfigError("--steps differs per stage; give --mae-steps, --dynamics-steps and/or "
                             "--imagination-steps instead")
    cfg = d4.parse_config("mae", __doc__, argv)   # every stage parses the same flags: check them once, up front
    forwarded = [arg for arg in argv if arg not in ("--resume", "--no-resume")]
    here = Path(__file__).resolve().parent
    for number, (script, checkpoint) in enumerate(STAGES, 1):
        resume = ["--resume"] if cfg.resume and (Path(cfg.run_dir) / checkpoint).exists() else []
        command = [sys.executable, str(here / script), *forwarded, *resume]
        print(f"stage {number}/3: {' '.join([script, *forwarded, *resume])}", flush=True)
        start = time.perf_counter()
        process = subprocess.Popen(command)
        try:
            status = process.wait()
        except KeyboardInterrupt:   # the stage got the Ctrl-C too: let it save its checkpoint and exit
            status = process.wait()
        if status != 0:
            sys.exit(status)
        print(f"stage {number}/3 done in {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    d4.run_cli(main)
