"""python -m client models status|stage|compare|promote|rollback|discard (docs/lifecycle.md)

    status                 the releases of a repository: in service, previous, staged; the audit's last entries
    stage RUN...           export trained runs into the repository as the next release, loaded beside the one
                           in service; `inspect_staged` runs it, the line's `inspect` does not
    compare --test DIR     the staged release against the one in service on the same cells (a labelled test
                           set, reviewed line cells, a replay of recent line cells), with the promotion rule's
                           decision; the flipped cells in OUT/results.jsonl (the review station opens it)
    promote                switch `inspect` (and inspect_ct, inspect_rgb) to the staged release, if the rule
                           allows; the previous release stays loaded
    rollback               switch back to the previous release, in seconds
    discard                drop the staged release

Every command that changes the repository appends to its audit.jsonl. The administrative
API needs the server's key: $TRITON_ADMIN_KEY, as `make serve` was given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from tqdm import tqdm
from tritonclient.utils import InferenceServerException

from client.channel import target
from client.lifecycle import audit, compare
from client.lifecycle.rule import RULE_FILE, decide, load_rule
from client.service import Backoff, InspectionClient
from core import interface as api
from core.reviewed import REVIEWED_RUN_FILE

ADMIN_KEY_ENV = "TRITON_ADMIN_KEY"


class _Release:
    """export.release, imported when a command runs: these commands work on the repository, where the
    exporter is; the client command line itself (and the gateway image) has no export package."""

    def __getattr__(self, name):
        from export import release  # noqa: PLC0415 - see the class docstring

        return getattr(release, name)


rel = _Release()
STAGED = api.INSPECT + api.STAGED_SUFFIX  # the ensemble that runs the staged release


def comparison_file(repository, release: int) -> Path:
    """<repository>/comparison-release-R.json: the last comparison of release R. A file beside the
    manifest, not a folder: tritonserver takes every folder of the repository for a model."""
    return Path(repository) / f"comparison-release-{release}.json"


def _kept_comparison(repository, release: int) -> Path:
    """The comparison `promote` judges; where a repository of an older version kept it, read from there."""
    path = comparison_file(repository, release)
    old = Path(repository) / "comparisons" / f"release-{release}.json"
    return old if not path.exists() and old.exists() else path


def _state(args) -> dict:
    return rel.read_state(args.repository)


def _server(args):
    return rel.Server(args.url, os.environ.get(ADMIN_KEY_ENV))


def _digests(state: dict, release: int | None) -> dict:
    if release is None:
        return {}
    runs = state["releases"][str(release)]["runs"]
    return {kind: r["checkpoint_sha256"] for kind, r in runs.items()}


def _release_summary(state: dict, release: int | None) -> dict | None:
    if release is None:
        return None
    entry = state["releases"][str(release)]
    return {"release": release, "runs": entry["runs"], "rule": entry.get("rule")}


# ----------------------------------------------------------------------------- status
def cmd_status(args) -> int:
    state = _state(args)
    roles = {state["serving"]: "in service", state.get("previous"): "previous", state.get("staged"): "staged"}
    running = rel.pinned(args.repository)
    print(f"{args.repository}: {len(state['releases'])} release(s); ensembles run release {running}")
    if running != state["serving"]:
        print(
            f"warning: the manifest has release {state['serving']} in service but the ensembles run release "
            f"{running}: a switch did not finish; promote or roll back again",
            file=sys.stderr,
        )
    for number in sorted(state["releases"], key=int):
        entry = state["releases"][number]
        runs = ", ".join(f"{k} {r['checkpoint_sha256'][:12]} ({r['path']})" for k, r in sorted(entry["runs"].items()))
        when = entry.get("staged") or entry.get("built", "")
        print(f"  {number:>3}  {roles.get(int(number), 'retired'):<10} {when}  {runs}")
    loaded = {}
    try:
        with _server(args) as server:
            server.client.is_server_live()  # raises where no server answers
            loaded = {r: server.ready(api.CT_CLASSIFIER, r) for r in map(int, state["releases"])}
            staged_ready = server.ready(STAGED)
        ready = ", ".join(str(r) for r, ok in loaded.items() if ok) or "none"
        print(f"loaded on {args.url}: release(s) {ready}; {STAGED} {'ready' if staged_ready else 'not loaded'}")
    except Exception as e:  # the repository can be read without a server
        print(f"server {args.url}: not reachable ({type(e).__name__})")
    for entry in audit.read(args.repository)[-args.history :] if args.history > 0 else []:
        print(f"  {entry['time']}  {entry['action']:<9} {entry['by']}  {_audit_line(entry)}")
    return 0


def _audit_line(entry: dict) -> str:
    parts = []
    for key in ("release", "from", "to"):
        if key in entry:
            parts.append(f"{key} {entry[key]}")
    if "decision" in entry:
        parts.append("rule: " + ("may go live" if entry["decision"]["promote"] else "refused"))
    if "seconds" in entry:
        parts.append(f"{entry['seconds']:.2f} s")
    return ", ".join(parts)


# ----------------------------------------------------------------------------- stage
def cmd_stage(args) -> int:
    from export.options import Tuning  # noqa: PLC0415 - with the exporter below
    from export.repository import stage_release  # noqa: PLC0415 - torch: only this command exports

    state = _state(args)
    if state.get("staged") is not None and not args.replace:
        print(
            f"error: release {state['staged']} is staged already: compare and promote it, or "
            "'python -m client models discard' it (or stage with --replace)",
            file=sys.stderr,
        )
        return 2
    if state.get("staged") is not None:
        _discard(args, state, reload=False)
        state = _state(args)
    start = time.monotonic()
    release = stage_release(
        args.repository, args.runs, args.rule, Tuning(precision=args.precision) if args.precision else None
    )
    if json.loads((Path(args.repository) / "manifest.json").read_text()).get("runtime") == "tensorrt":
        from export.tensorrt import build_repository_engines  # noqa: PLC0415 - TensorRT, on the GPU that serves

        build_repository_engines(args.repository)  # the new release's engines; the others exist
    exported = time.monotonic() - start
    state = _state(args)
    loaded = None
    if not args.no_load:
        with _server(args) as server:
            loaded = server.load([*rel.RELEASED, STAGED])
    print(
        f"staged release {release} in {args.repository} (exported in {exported:.1f} s"
        + (f", loaded on {args.url} in {loaded:.1f} s" if loaded is not None else ", not loaded: --no-load")
        + f"); {STAGED} runs it, {api.INSPECT} still runs release {state['serving']}"
    )
    print("next: python -m client models compare --test DIR [--reviewed ARCHIVE] [--replay ARCHIVE]")
    audit.record(
        args.repository,
        "stage",
        audit.actor(args.by),
        release=release,
        serving=state["serving"],
        models=_digests(state, release),
        training=_release_summary(state, release),
        seconds=round(exported + (loaded or 0.0), 3),
    )
    return 0


# ----------------------------------------------------------------------------- compare
def cmd_compare(args) -> int:
    state = _state(args)
    staged = state.get("staged")
    if staged is None:
        print("error: no release is staged: 'python -m client models stage RUN...' first", file=sys.stderr)
        return 2
    rule = load_rule(args.rule)
    trained_on = set()
    for run in state["releases"][str(staged)]["runs"].values():
        path = Path(run["path"]) / REVIEWED_RUN_FILE
        if path.exists():
            trained_on |= set(json.loads(path.read_text()).get("trained", []))
    sets: dict[str, list[compare.Case]] = {}
    if args.test:
        sets["test"] = compare.test_cases(args.test)
    if args.reviewed:
        every = compare.reviewed_cases(args.reviewed, exclude=set())
        sets["reviewed"] = [c for c in every if c.cell_id not in trained_on]
        if trained_on:  # reported apart, not ruled on: what the release learnt from the line's reviews
            sets["reviewed_trained"] = [c for c in every if c.cell_id in trained_on]
    if args.replay:
        sets["replay"] = compare.replay_cases(args.replay, args.replay_limit)
    if not sets:
        print("error: nothing to compare on: give --test, --reviewed and/or --replay", file=sys.stderr)
        return 2
    total = sum(len(c) for c in sets.values())
    start = time.monotonic()
    with (
        InspectionClient(args.url, model=api.INSPECT, heatmaps=False, backoff=Backoff(retries=2)) as serving,
        InspectionClient(args.url, model=STAGED, heatmaps=False, backoff=Backoff(retries=2)) as staged_client,
    ):
        bar = tqdm(total=2 * total, unit="cell", desc="compare", disable=args.quiet)
        for cases in sets.values():
            compare.answer(cases, "serving", serving, args.concurrency, bar.update)
            compare.answer(cases, "staged", staged_client, args.concurrency, bar.update)
        bar.close()
    metrics = {
        "test": compare.LABELLED,
        "reviewed": compare.REVIEWED,
        "reviewed_trained": compare.REVIEWED,
        "replay": {},
    }
    comparison = {
        "serving": state["serving"],
        "staged": staged,
        "models": {"serving": _digests(state, state["serving"]), "staged": _digests(state, staged)},
        "seconds": round(time.monotonic() - start, 1),
        "sets": {},
    }
    for name, cases in sets.items():
        comparison["sets"][name] = {
            "source": _source(args, name),
            "counts": compare.counts(cases),
            "figures": compare.figures(cases, metrics[name], seed=args.seed),
            "flips": compare.flips(cases, name),
        }
    comparison["decision"] = decide(comparison, rule)
    comparison["rule"] = {"file": str(args.rule or RULE_FILE), "spec": rule}
    out = args.out or Path("results") / f"compare-release-{staged}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.json").write_text(json.dumps(comparison, indent=1) + "\n")
    compare.write_results(out, sets)
    comparison_file(args.repository, staged).write_text(json.dumps(comparison, indent=1) + "\n")
    _print_comparison(comparison)
    print(f"wrote {out / 'comparison.json'} and the flipped cells to {out / 'results.jsonl'} (python -m client review)")
    audit.record(
        args.repository,
        "compare",
        audit.actor(args.by),
        release=staged,
        serving=state["serving"],
        sets={k: v["counts"] for k, v in comparison["sets"].items()},
        decision=comparison["decision"],
        comparison=str(out / "comparison.json"),
    )
    return 0


def _source(args, name: str) -> str:
    if name == "test":
        return str(args.test)
    if name == "replay":
        return str(args.replay)
    folders = ", ".join(map(str, args.reviewed))
    return folders + (" (cells the staged release trained on)" if name == "reviewed_trained" else " (not trained on)")


def _value(value: float, interval: list[float], signed: bool = False) -> str:
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(value)} [{f.format(interval[0])}, {f.format(interval[1])}]"


def _print_comparison(c: dict) -> None:
    print(f"\nrelease {c['staged']} (staged) against release {c['serving']} (in service)")
    for name, part in c["sets"].items():
        n = part["counts"]
        print(
            f"\n{name}: {n['cells']} cells from {part['source']}; verdicts changed on {n['flips']} "
            f"({n['flip_rate']:.1%}); refused: serving {n['serving']['refused']}, staged {n['staged']['refused']}"
        )
        if part["figures"]:
            print(f"  {'':<24}{'serving':>22}{'staged':>22}{'difference':>24}")
            for metric, row in part["figures"].items():
                cells = [_value(row[s], row[s + "_ci95"]) for s in ("serving", "staged")]
                difference = _value(row["difference"], row["difference_ci95"], signed=True)
                print(f"  {metric:<24}{cells[0]:>22}{cells[1]:>22}{difference:>24}")
        better = sum(1 for f in part["flips"] if f.get("better"))
        worse = sum(1 for f in part["flips"] if f.get("worse"))
        if "expected" in (part["flips"][0] if part["flips"] else {}):
            print(f"  flips: {better} to the label's verdict, {worse} away from it")
    d = c["decision"]
    print("\npromotion rule: " + ("MAY GO LIVE" if d["promote"] else "REFUSED"))
    for line in d["reasons"]:
        print(f"  - {line}")


# ----------------------------------------------------------------------------- promote / rollback / discard
def cmd_promote(args) -> int:
    state = _state(args)
    staged = state.get("staged")
    if staged is None:
        print("error: no release is staged", file=sys.stderr)
        return 2
    path = args.comparison or _kept_comparison(args.repository, staged)
    comparison = json.loads(path.read_text()) if Path(path).exists() else None
    if comparison is None:
        problem = f"release {staged} was never compared ('python -m client models compare --test DIR')"
    elif comparison.get("staged") != staged or comparison.get("models", {}).get("staged") != _digests(state, staged):
        problem = f"{path} compares other models than staged release {staged}"
    elif not comparison["decision"]["promote"]:
        problem = "the promotion rule refused it: " + "; ".join(comparison["decision"]["reasons"])
    else:
        problem = None
    if problem and not args.force:
        print(f"error: release {staged} may not go live: {problem} (--force --reason TEXT overrides)", file=sys.stderr)
        return 2
    if problem and not args.reason:
        print("error: --force needs --reason: the audit trail records why the rule was overridden", file=sys.stderr)
        return 2
    with _server(args) as server:
        old, _, seconds = rel.promote(args.repository, server)
    state = _state(args)
    print(f"release {staged} in service ({api.INSPECT} switched in {seconds:.2f} s); release {old} kept loaded")
    print("back: python -m client models rollback")
    audit.record(
        args.repository,
        "promote",
        audit.actor(args.by),
        **{"from": old, "to": staged},
        models={"from": _digests(state, old), "to": _digests(state, staged)},
        training=_release_summary(state, staged),
        comparison=_comparison_summary(comparison),
        decision=comparison["decision"] if comparison else None,
        forced=bool(problem),
        reason=args.reason or "",
        seconds=round(seconds, 3),
    )
    return 0


def _comparison_summary(comparison: dict | None) -> dict | None:
    if comparison is None:
        return None
    return {name: {"counts": part["counts"], "figures": part["figures"]} for name, part in comparison["sets"].items()}


def cmd_rollback(args) -> int:
    try:
        with _server(args) as server:
            old, back, seconds = rel.rollback(args.repository, server, args.to)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    state = _state(args)
    print(f"release {back} in service again ({api.INSPECT} switched in {seconds:.2f} s); release {old} kept")
    audit.record(
        args.repository,
        "rollback",
        audit.actor(args.by),
        **{"from": old, "to": back},
        models={"from": _digests(state, old), "to": _digests(state, back)},
        reason=args.reason or "",
        seconds=round(seconds, 3),
    )
    return 0


def _discard(args, state: dict, reload: bool = True) -> int:
    staged = state["staged"]
    rel.remove_staged_ensembles(args.repository)
    state["staged"] = None
    rel.write_state(args.repository, state)
    rel.set_loaded(args.repository, rel.kept_releases(state))
    if reload and not args.no_load:
        with _server(args) as server:
            server.unload(STAGED)
            server.load(rel.RELEASED)
    return staged


def cmd_discard(args) -> int:
    state = _state(args)
    if state.get("staged") is None:
        print("nothing staged")
        return 0
    staged = _discard(args, state)
    print(f"release {staged} discarded (its files stay in the repository; the audit trail records it)")
    audit.record(args.repository, "discard", audit.actor(args.by), release=staged, reason=args.reason or "")
    return 0


def _said(command):
    """A command whose foreseeable failures (no repository, a wrong file, no server, a refused load)
    end in one line on stderr and exit code 2, not a traceback."""

    def run(args) -> int:
        try:
            return command(args)
        except (FileNotFoundError, ValueError, json.JSONDecodeError) as e:
            print(f"error: {e}", file=sys.stderr)
        except InferenceServerException as e:
            print(f"error: the server at {args.url} did not do it: {e.message() or e}", file=sys.stderr)
        return 2

    run.__doc__ = command.__doc__
    return run


# ----------------------------------------------------------------------------- parser
def _url(text: str) -> str:
    try:
        target(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_parsers(sub) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--repository",
        type=Path,
        default=Path("model_repository"),
        help="the served repository (default model_repository, what make serve serves)",
    )
    common.add_argument("--url", type=_url, default="localhost:8001", help="the server's gRPC address")
    common.add_argument("--by", help="who acts, for the audit trail (default $BATTERY_ACTOR, else user@host)")
    m = sub.add_parser(
        "models",
        help="change the model on a running line: stage, compare, promote, roll back",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    msub = m.add_subparsers(dest="models_command", required=True)
    s = msub.add_parser("status", parents=[common], help="releases, the one in service, the audit trail")
    s.add_argument("--history", type=int, default=5, help="audit entries shown (default 5)")
    s.set_defaults(func=_said(cmd_status))
    s = msub.add_parser("stage", parents=[common], help="export trained runs as the next release, serving no traffic")
    s.add_argument("runs", nargs="+", type=Path, help="run folders (or a preset folder holding ct/ and rgb/)")
    s.add_argument("--rule", type=Path, help="verdict rule file (default ensemble/rule.yaml)")
    s.add_argument("--precision", choices=["fp32", "fp16", "int8"], help="default: the repository's")
    s.add_argument("--replace", action="store_true", help="discard a release already staged")
    s.add_argument("--no-load", action="store_true", help="write the repository only (no server to load it on)")
    s.set_defaults(func=_said(cmd_stage))
    s = msub.add_parser("compare", parents=[common], help="the staged release against the one in service")
    s.add_argument("--test", type=Path, help="a fresh labelled data set (AI Hub layout)")
    s.add_argument(
        "--reviewed",
        type=Path,
        action="append",
        metavar="DIR",
        help="line archive or run folder with reviewed cells (those the staged release trained on are left out)",
    )
    s.add_argument("--replay", type=Path, metavar="ARCHIVE", help="a line archive: its most recent cells")
    s.add_argument("--replay-limit", type=int, default=500, help="recent cells replayed (default 500)")
    s.add_argument("--rule", type=Path, help="promotion rule YAML (default client/lifecycle/promotion.yaml)")
    s.add_argument(
        "--out", type=Path, help="folder for comparison.json and the flips (default results/compare-release-R)"
    )
    s.add_argument("--concurrency", type=int, default=4, help="requests in flight per release (default 4)")
    s.add_argument("--seed", type=int, default=0, help="the bootstrap's seed")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=_said(cmd_compare))
    s = msub.add_parser("promote", parents=[common], help="the staged release goes live, if the rule allows")
    s.add_argument("--comparison", type=Path, help="comparison.json to decide on (default: the staged release's last)")
    s.add_argument("--force", action="store_true", help="promote although the rule refused (needs --reason)")
    s.add_argument("--reason", help="why, for the audit trail")
    s.set_defaults(func=_said(cmd_promote))
    s = msub.add_parser("rollback", parents=[common], help="back to the previous release")
    s.add_argument("--to", type=int, help="a release number (default the previous one)")
    s.add_argument("--reason", help="why, for the audit trail")
    s.set_defaults(func=_said(cmd_rollback))
    s = msub.add_parser("discard", parents=[common], help="drop the staged release")
    s.add_argument("--reason", help="why, for the audit trail")
    s.add_argument("--no-load", action="store_true", help="change the repository only")
    s.set_defaults(func=_said(cmd_discard))
