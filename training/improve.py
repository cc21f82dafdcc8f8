"""python -m training.improve [--preset standard] [--url localhost:8001] [--repository model_repository]

A first `make serve` has minutes to train: it serves the quick preset's models, which are a
demonstration (docs/training.md shows why minutes cannot give more on 2 cores). This trains
the standard preset in the background, at the lowest CPU priority so that the line's requests
come first, and then moves the running server to its models the way a line changes models
(docs/lifecycle.md):

  1. train       python -m training.preset standard (skipped when runs/standard is trained)
  2. stage       python -m client models stage runs/standard      (the next release, no traffic)
  3. compare     python -m client models compare --test data/standard_test
  4. promote     python -m client models promote                  (only if the promotion rule allows)

`make serve` starts it on a first start (`--no-improve` turns that off). Each step's output
goes to runs/standard/improve.log; one line per step is printed. A release the rule refuses
stays staged for a person to look at (`python -m client models status`); nothing is forced.
The administrative key is taken from $TRITON_ADMIN_KEY (`make serve` hands its own over).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

LOG = "improve.log"


def has_runs(folder: Path) -> bool:
    return (folder / "ct" / "checkpoint.pt").exists() and (folder / "rgb" / "checkpoint.pt").exists()


class Improver:
    def __init__(
        self, preset: str, url: str, repository: Path, runs: Path, test_data: Path, by: str, rule: Path | None = None
    ):
        self.preset, self.url, self.repository, self.runs, self.test_data = preset, url, repository, runs, test_data
        self.by, self.rule = by, rule
        self.runs.mkdir(parents=True, exist_ok=True)
        self.log = self.runs / LOG
        self.start = time.monotonic()

    def say(self, text: str) -> None:
        line = f"improve [{(time.monotonic() - self.start) / 60:5.1f} min]: {text}"
        print(line, flush=True)
        with self.log.open("a") as f:
            f.write(line + "\n")

    def step(self, name: str, args: list[str]) -> int:
        """Run `python -m ARGS`, its output appended to the log; its exit status."""
        with self.log.open("a") as f:
            f.write(f"\n$ python -m {' '.join(args)}\n")
            f.flush()
            return subprocess.run([sys.executable, "-m", *args], stdout=f, stderr=subprocess.STDOUT).returncode

    def lifecycle(self, command: str) -> list[str]:
        return ["client", "models", command, "--url", self.url, "--repository", str(self.repository), "--by", self.by]

    def run(self) -> int:
        if has_runs(self.runs) and (self.runs / "summary.json").exists():
            self.say(f"{self.runs} is trained already: staging it")
        else:
            self.say(f"training the {self.preset} preset in the background (lowest CPU priority); log: {self.log}")
            if self.step("train", ["training.preset", self.preset, "--out", str(self.runs)]):
                return self.fail("training failed")
            self.say(f"trained: {_quality(self.runs)}")
        if not self.test_data.is_dir():
            return self.fail(f"no fresh test data in {self.test_data} to compare on (--test-data)")
        if self.step("stage", [*self.lifecycle("stage"), str(self.runs)]):
            return self.fail("staging failed (a release staged already? python -m client models status)")
        self.say("staged as the next release; comparing it with the release in service on fresh test data")
        rule = ["--rule", str(self.rule)] if self.rule else []
        if self.step("compare", [*self.lifecycle("compare"), "--test", str(self.test_data), "--quiet", *rule]):
            return self.fail("the comparison failed")
        if self.step("promote", self.lifecycle("promote")):
            return self.fail(
                "the promotion rule refused the new release (its reasons are in the log); it stays staged: "
                "python -m client models status"
            )
        self.say(f"the {self.preset} preset's models are in service now ({_quality(self.runs)})")
        return 0

    def fail(self, why: str) -> int:
        self.say(f"{why}; the models in service are unchanged; see {self.log}")
        return 1


def _quality(runs: Path) -> str:
    """What the preset's summary.json says its models reach on fresh test data."""
    try:
        results = json.loads((runs / "summary.json").read_text())["results"]
        return (
            f"CT macro-F1 {results['ct']['macro_f1']:.2f}, RGB image AUROC {results['rgb']['image_roc_auc']:.2f} "
            "on fresh test data"
        )
    except (OSError, ValueError, KeyError, TypeError):
        return "no figures in its summary.json"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m training.improve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", default="standard", help="the preset to train and move to (default standard)")
    p.add_argument("--url", default="localhost:8001", help="the running server's gRPC address")
    p.add_argument("--repository", type=Path, default=Path("model_repository"), help="the repository it serves")
    p.add_argument("--runs", type=Path, help="run folder (default runs/PRESET)")
    p.add_argument("--test-data", type=Path, help="fresh labelled data to compare on (default data/PRESET_test)")
    p.add_argument("--rule", type=Path, help="promotion rule YAML (default client/lifecycle/promotion.yaml)")
    p.add_argument("--by", default="first start", help="who acts, for the audit trail")
    p.add_argument("--nice", type=int, default=19, help="CPU priority added to this process (default 19, the lowest)")
    args = p.parse_args(argv)
    name = Path(args.preset).stem
    if args.nice:
        os.nice(args.nice)
    improver = Improver(
        args.preset,
        args.url,
        args.repository,
        args.runs or Path("runs") / name,
        args.test_data or Path("data") / f"{name}_test",
        args.by,
        args.rule,
    )
    return improver.run()


if __name__ == "__main__":
    sys.exit(main())
