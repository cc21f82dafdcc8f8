"""The layers of docs/architecture.md, checked on the source: each module imports only from its
own layer and the layers below, no import cycle between modules, and the client library works
with training/ and export/ absent."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Bottom to top. A module belongs to the layer of its longest matching prefix; a layer may
# import from itself and from every layer below it, never from one above or beside it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("core",)),
    ("rule", ("ensemble",)),
    ("training", ("training",)),
    ("serving", ("serving",)),
    ("export", ("export",)),
    ("client library", ("client",)),
    (
        "applications",
        (
            "client.__main__",
            "client.offline",
            "client.explain",
            "client.gateway",
            "client.review",
            "client.lifecycle",
            "benchmarks",
        ),
    ),
]
# Layers on one level: neither imports the other.
LEVEL = {"core": 0, "rule": 1, "training": 2, "serving": 2, "export": 3, "client library": 4, "applications": 5}
PACKAGES = ("core", "ensemble", "training", "serving", "export", "client", "benchmarks")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str | None:
    best, found = -1, None
    for layer, prefixes in LAYERS:
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, found = len(prefix), layer
    return found


def imports(path: Path, modules: set[str]) -> set[str]:
    """The project modules `path` imports, anywhere in it (a lazy import is still an import);
    `from package import module` imports that module, not the package's __init__."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        found |= {n for n in names if n.split(".")[0] in PACKAGES}
    return found


def graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (names that are not modules, e.g. a class, are
    resolved to the module that holds them)."""
    files = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    out = {}
    for module, path in files.items():
        targets = set()
        for name in imports(path, set(files)):
            while name and name not in files:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
        out[module] = targets
    return out


def violations(g: dict[str, set[str]]) -> list[str]:
    """Each import of a module from a layer above or beside its own."""
    wrong = []
    for module, targets in g.items():
        mine = layer_of(module)
        for target in sorted(targets):
            theirs = layer_of(target)
            if theirs != mine and LEVEL[theirs] >= LEVEL[mine]:
                wrong.append(f"{module} ({mine}) imports {target} ({theirs})")
    return wrong


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles: strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in list(g):
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_layer():
    assert [m for m in graph() if layer_of(m) is None] == []


def test_no_module_imports_from_a_layer_above_or_beside_it():
    assert violations(graph()) == []


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_the_checks_see_what_they_are_for():
    g = {
        "core.labels": {"export.repository"},
        "export.repository": {"core.labels"},
        "training.train": {"serving.runtime"},
        "serving.runtime": set(),
        "client.service": {"client.gateway.plc"},
        "client.gateway.plc": {"client.service"},
    }
    assert violations(g) == [
        "core.labels (core) imports export.repository (export)",
        "training.train (training) imports serving.runtime (serving)",
        "client.service (client library) imports client.gateway.plc (applications)",
    ]
    assert sorted(cycles(g)) == [["client.gateway.plc", "client.service"], ["core.labels", "export.repository"]]
    assert imports(ROOT / "client" / "offline.py", set(graph())) >= {"export.local", "client.inspection"}


def run_without(absent: tuple[str, ...], body: str, *args: str, cwd: Path = ROOT, env: dict | None = None):
    """Run `body` in a fresh interpreter where importing any of `absent` (or a submodule) fails."""
    script = (
        "import sys, importlib.abc\n"
        f"ABSENT = {absent!r}\n"
        "class Absent(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if any(name == a or name.startswith(a + '.') for a in ABSENT):\n"
        "            raise ImportError(f'{name} is absent')\n"
        "sys.meta_path.insert(0, Absent())\n"
    ) + body
    return subprocess.run(
        [sys.executable, "-c", script, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    "modules", [["client", "client.service", "client.inspection", "client.metrics", "client.probe", "client.dataset"]]
)
def test_the_client_library_imports_with_training_and_export_absent(modules):
    body = f"for m in {modules!r}:\n    __import__(m)\nfrom client.service import InspectionClient\nprint('ok')\n"
    out = run_without(("training", "export", "torch"), body)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_the_server_image_holds_what_the_server_runs_and_nothing_more(tmp_path):
    """docker/Dockerfile's serving stage copies core/, ensemble/, serving/ and the export commands
    its entrypoint runs; with only those (and only the packages that stage installs), the
    Python-backend code prepares a cell and `python -m export fit-cores` / `tensorrt` start."""
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text().split("\nFROM ")[-1]
    copied = []
    for line in dockerfile.splitlines():
        parts = line.split()
        if parts[:1] == ["COPY"] and not parts[1].startswith("--") and parts[-1].startswith("/opt/battery/"):
            dest = tmp_path / parts[-1].removeprefix("/opt/")
            for source in parts[1:-1]:
                src = ROOT / source
                target = dest / src.name if parts[-1].endswith("/") else dest
                target.parent.mkdir(parents=True, exist_ok=True)
                if src.is_dir():
                    shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy(src, target)
                copied.append(source)
    assert {"core", "ensemble", "serving"} <= set(copied) and not {"training", "client", "benchmarks"} & set(copied)
    image_lacks = ("torch", "torchvision", "onnx", "onnxruntime", "onnxscript", "timm", "sklearn", "skimage", "tqdm")
    image_lacks += (
        "matplotlib",
        "pytriton",
        "prometheus_client",
        "tritonclient.http",
        "training",
        "client",
        "benchmarks",
    )
    body = (
        "import io\n"
        "import numpy as np\n"
        "from PIL import Image\n"
        "import serving, serving.runtime as rt\n"
        "from core.facts import ServingFacts\n"
        "from ensemble.rule import decide\n"
        "assert serving.__file__.startswith(sys.argv[1]), serving.__file__\n"
        "photo = (np.random.default_rng(0).random((64, 96, 3)) * 255).astype(np.uint8)\n"
        "buf = io.BytesIO(); Image.fromarray(photo).save(buf, 'PNG')\n"
        "facts = ServingFacts(kind='rgb_autoencoder', input_size=32, in_chans=3)\n"
        "print(rt.rgb_tensors(np.array([[buf.getvalue()]], object), facts).shape)\n"
        "from export.__main__ import main\n"
        "for command in ('fit-cores', 'tensorrt'):\n"
        "    try:\n"
        "        main([command, '--help'])\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(tmp_path / "battery")}
    out = run_without(image_lacks, body, str(tmp_path), cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("(1, 3, 32, 32)") and "fit-cores" in out.stdout and "TensorRT" in out.stdout


def test_the_client_command_line_starts_without_torch():
    """`python -m client probe` is a liveness probe and `inspect` a station's tool: the command
    line loads torch (and the export and training packages) only for --local and --gradcam torch."""
    script = (
        "import sys, client.__main__\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'export', 'training'}))"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def _closure(requirements: list[str]) -> set[str]:
    """The distributions pip installs for `requirements` (name[extras]==version), as this
    environment's metadata declares them: the packages and what they require, transitively."""
    from importlib import metadata  # noqa: PLC0415

    from packaging.requirements import Requirement  # noqa: PLC0415
    from packaging.utils import canonicalize_name  # noqa: PLC0415

    seen: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        key = name + "[" + ",".join(sorted(req.extras)) + "]"
        if key in seen:
            continue
        seen.add(key)
        seen.add(name)
        for text in metadata.requires(req.name) or []:
            dep = Requirement(text)
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in ("", *req.extras)):
                todo.append(dep)
    return {s for s in seen if "[" not in s}


def test_the_gateway_image_holds_what_the_gateway_runs(tmp_path):
    """docker/Dockerfile.gateway copies core/, ensemble/ and client/ and installs a short list of
    packages; with only those folders, `python -m client gateway --help` starts and every
    third-party module the gateway imports comes from a listed package or one it requires."""
    dockerfile = (ROOT / "docker" / "Dockerfile.gateway").read_text()
    copied = re.findall(r"^COPY (\w+) /opt/battery/\1$", dockerfile, re.M)
    assert set(copied) == {"core", "ensemble", "client"}
    for name in copied:
        shutil.copytree(ROOT / name, tmp_path / "battery" / name, ignore=shutil.ignore_patterns("__pycache__"))
    install = " ".join(re.findall(r"pip install --no-cache-dir ((?:[^&\\\n]|\\\n)+)", dockerfile)[0].split("\\\n"))
    listed = [p.strip('"') for p in install.split()]
    assert "tritonclient[grpc]==2.51.0" in listed and not any(p.startswith("torch") for p in listed)
    allowed = _closure(listed)
    body = (
        "import json, sys\n"
        "from importlib import metadata\n"
        "from client.__main__ import main\n"
        "import client.gateway.gateway\n"
        "try:\n"
        "    main(['gateway', '--help'])\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0\n"
        "ours = {'client', 'core', 'ensemble'}\n"
        "top = {m.split('.')[0] for m in sys.modules} - set(sys.stdlib_module_names) - ours\n"
        "dists = metadata.packages_distributions()\n"
        "print(json.dumps({m: dists.get(m, []) for m in sorted(top) if not m.startswith('_')}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(tmp_path / "battery")}
    # brotli: urllib3 uses it where it is installed, and does without
    absent = ("torch", "training", "export", "serving", "benchmarks", "transformers", "timm", "onnxruntime", "brotli")
    out = run_without(absent, body, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    modules = json.loads(out.stdout.strip().splitlines()[-1])
    from packaging.utils import canonicalize_name  # noqa: PLC0415

    outside = {m: d for m, d in modules.items() if d and not {canonicalize_name(x) for x in d} & allowed and m != "pip"}
    assert outside == {}, f"imported by the gateway but not installed in its image: {outside}"
    assert {"asyncua", "tritonclient", "yaml"} <= set(modules)
