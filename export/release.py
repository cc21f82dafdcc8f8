"""Releases of a built repository: which one `inspect` serves, which is staged, which is kept ready.

Release R is version R of every model inside the ensembles (`preprocess`, `ct_preprocess`,
`ct_classifier`, `rgb_preprocess`, `rgb_autoencoder`, `verdict`): its networks in
`<model>/R/`, what is its own (serving facts, the rule, its description) as config parameters
`name@R` (core.interface.release_key). The ensembles pin the release they run:

    inspect, inspect_ct, inspect_rgb    the release in service
    inspect_staged                      the staged release: compared and shadowed, answers no line

Each model loads the releases it may be asked for (version_policy specific): the one in service,
the previous one (rollback in seconds) and the staged one. Staging (export.repository.stage_release)
adds a release; promoting and rolling back only re-pin the ensembles, whose load is a swap that
finishes the requests under way on the old pinning. The manifest records the state; every
change is appended to `audit.jsonl` beside it by the command that makes it (client/lifecycle).

No torch here: promotion and rollback run where only the server's packages are.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from google.protobuf import text_format

from core import interface as api
from export.spec import MANIFEST, ModelSpec, parse_pbtxt, to_config

RELEASED = (
    api.PREPROCESS,
    api.CT_PREPROCESS,
    api.CT_CLASSIFIER,
    api.RGB_PREPROCESS,
    api.RGB_AUTOENCODER,
    api.VERDICT_MODEL,
)
SERVED = (api.INSPECT, api.INSPECT_CT, api.INSPECT_RGB)  # what the line calls
STAGED = api.INSPECT + api.STAGED_SUFFIX
ADMIN_HEADER = "triton-grpc-protocol-admin-key"


def release_state(releases: dict, serving: int, previous: int | None = None, staged: int | None = None) -> dict:
    return {"releases": releases, "serving": serving, "previous": previous, "staged": staged}


def read_state(repository: str | Path) -> dict:
    """The manifest's release state; a repository built before releases existed is release 1, serving."""
    path = Path(repository) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{repository} is not a built repository (no {MANIFEST}); build it with make serve")
    manifest = json.loads(path.read_text())
    if "releases" not in manifest:
        first = {k: manifest[k] for k in ("runs", "rule", "precision", "built") if k in manifest}
        return release_state({"1": first}, serving=1)
    return {k: manifest[k] for k in ("releases", "serving", "previous", "staged")}


def write_state(repository: str | Path, state: dict) -> None:
    path = Path(repository) / MANIFEST
    manifest = json.loads(path.read_text()) | state
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.replace(path)


def kept_releases(state: dict, new: int | None = None) -> tuple[int, ...]:
    """The releases each model keeps loaded: in service, previous, staged (or `new`, the one being staged)."""
    kept = {state["serving"], state.get("previous"), new if new is not None else state.get("staged")}
    return tuple(sorted(r for r in kept if r is not None))


def _signature(cfg) -> list:
    def tensors(ts):
        return [(t.name, t.data_type, tuple(t.dims), getattr(t, "optional", False)) for t in ts]

    return [cfg.backend, cfg.platform, cfg.max_batch_size, tensors(cfg.input), tensors(cfg.output)]


def merged_configs(repository: str | Path, specs, release: int, keep: tuple[int, ...]) -> dict[str, str]:
    """Each released model's config with release `release` added: its parameters `name@release`,
    and the versions it loads set to `keep`. Refuses a release whose tensors differ from the
    repository's (another input size, other outputs): that is a new repository, not a release.
    The rest of each config (instances, threads, limits, fit-cores' changes) stays as it is."""
    out = {}
    for spec in specs:
        if not isinstance(spec, ModelSpec):
            continue
        path = Path(repository) / spec.name / "config.pbtxt"
        cfg = parse_pbtxt(path.read_text())
        new = to_config(spec)
        if _signature(cfg) != _signature(new):
            raise ValueError(
                f"release {release}'s {spec.name} has other inputs or outputs than {repository}'s "
                f"({_describe(new)} against {_describe(cfg)}): a network of another input size or output "
                "set cannot be a release of this repository; build a new one with python -m export repository"
            )
        suffix = f"@{release}"
        for key, value in new.parameters.items():
            if key.endswith(suffix):
                cfg.parameters[key].CopyFrom(value)
        cfg.version_policy.specific.ClearField("versions")
        cfg.version_policy.specific.versions.extend(keep)
        out[spec.name] = text_format.MessageToString(cfg)
    return out


def _describe(cfg) -> str:
    return ", ".join(f"{t.name} {list(t.dims)}" for t in [*cfg.input, *cfg.output])


def set_loaded(repository: str | Path, keep: tuple[int, ...]) -> list[str]:
    """Set the versions every released model loads to `keep`; returns the models changed."""
    changed = []
    for name in RELEASED:
        path = Path(repository) / name / "config.pbtxt"
        cfg = parse_pbtxt(path.read_text())
        if tuple(cfg.version_policy.specific.versions) != tuple(keep):
            cfg.version_policy.specific.ClearField("versions")
            cfg.version_policy.specific.versions.extend(keep)
            path.write_text(text_format.MessageToString(cfg))
            changed.append(name)
    return changed


def pinned(repository: str | Path, name: str = api.INSPECT) -> int:
    """The release ensemble `name` runs (the version of its steps)."""
    cfg = parse_pbtxt((Path(repository) / name / "config.pbtxt").read_text())
    versions = {s.model_version for s in cfg.ensemble_scheduling.step}
    if len(versions) != 1:
        raise ValueError(f"{name} runs versions {sorted(versions)} of its steps, not one release")
    return versions.pop()


def _pin(cfg, release: int) -> None:
    for step in cfg.ensemble_scheduling.step:
        step.model_version = release


def pin(repository: str | Path, release: int, names=SERVED) -> list[str]:
    """Make ensembles `names` run release `release`; returns the ensembles changed."""
    changed = []
    for name in names:
        path = Path(repository) / name / "config.pbtxt"
        cfg = parse_pbtxt(path.read_text())
        if {s.model_version for s in cfg.ensemble_scheduling.step} != {release}:
            _pin(cfg, release)
            path.write_text(text_format.MessageToString(cfg))
            changed.append(name)
    return changed


def write_staged_ensembles(repository: str | Path, release: int) -> str:
    """`inspect_staged`: `inspect` with every step on release `release`."""
    repository = Path(repository)
    cfg = parse_pbtxt((repository / api.INSPECT / "config.pbtxt").read_text())
    cfg.name = STAGED
    _pin(cfg, release)
    (repository / STAGED / "1").mkdir(parents=True, exist_ok=True)
    (repository / STAGED / "config.pbtxt").write_text(text_format.MessageToString(cfg))
    return STAGED


def remove_staged_ensembles(repository: str | Path) -> None:
    folder = Path(repository) / STAGED
    if folder.exists():
        for path in sorted(folder.rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        folder.rmdir()


def _swap(repository: str | Path, server: Server, release: int) -> float:
    """Pin the line's ensembles to `release` and load them; where the server does not take them,
    the repository goes back to the pinning it had, so that it never says what is not served."""
    before = pinned(repository)
    server.client.is_server_live()  # an unreachable server fails here, before anything changes
    pin(repository, release)
    try:
        return server.load(SERVED)
    except Exception:
        pin(repository, before)
        raise


def promote(repository: str | Path, server: Server) -> tuple[int, int, float]:
    """Switch the line's ensembles to the staged release, keep the one in service as the previous,
    drop `inspect_staged`. Returns (old, new, the seconds the swap took). Checks nothing: the
    promotion rule is the caller's (python -m client models promote)."""
    state = read_state(repository)
    old, new = state["serving"], state.get("staged")
    if new is None:
        raise ValueError(f"{repository} has no staged release to promote")
    seconds = _swap(repository, server, new)
    state.update(serving=new, previous=old, staged=None)
    write_state(repository, state)
    remove_staged_ensembles(repository)
    server.unload(STAGED)
    return old, new, seconds


def rollback(repository: str | Path, server: Server, to: int | None = None) -> tuple[int, int, float]:
    """Switch the line's ensembles back to the previous release (or release `to`, loaded first
    if it is no longer); returns (old, new, the seconds the swap took)."""
    state = read_state(repository)
    old, new = state["serving"], to if to is not None else state.get("previous")
    if new is None:
        raise ValueError("there is no previous release to go back to")
    if str(new) not in state["releases"]:
        raise ValueError(f"release {new} is not in {repository}")
    if new not in kept_releases(state):  # an older release: load it first
        set_loaded(repository, tuple(sorted({*kept_releases(state), new})))
        server.load(RELEASED)
    seconds = _swap(repository, server, new)
    state.update(serving=new, previous=old)
    write_state(repository, state)
    return old, new, seconds


class Server:
    """A running tritonserver's model-repository API (gRPC, with the admin key)."""

    def __init__(self, url: str, admin_key: str | None):
        import tritonclient.grpc as grpcclient  # noqa: PLC0415 - only the commands that change a running server

        self.client = grpcclient.InferenceServerClient(url)
        self.headers = {ADMIN_HEADER: admin_key} if admin_key else None

    def load(self, names, timeout_s: float = 300.0) -> float:
        """Load (or reload) each model, in order; returns the seconds it took."""
        start = time.monotonic()
        for name in names:
            self.client.load_model(name, headers=self.headers, client_timeout=timeout_s)
        return time.monotonic() - start

    def unload(self, name: str) -> None:
        self.client.unload_model(name, headers=self.headers, unload_dependents=False)

    def ready(self, name: str, version: int | str = "") -> bool:
        try:
            return self.client.is_model_ready(name, str(version))
        except Exception:  # not loaded, not known
            return False

    def close(self) -> None:
        self.client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
