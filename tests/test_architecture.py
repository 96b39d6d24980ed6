"""The structure the code promises: no import circles, imports at the top (heavy ones excepted, listed in
tests/importgraph.py), and the kind of preset read only inside sfd/tasks/."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

from importgraph import Graph

ROOT = Path(__file__).resolve().parent.parent
# what reading the kind of preset looks like: its field, the old flags, or a test of which targets class a
# run has; sfd/tasks/ (which chooses the task) and sfd/presets.py (which declares the field) may
KIND_PATTERNS = (r"\.task\b(?!s)", r"[\"']conditioning[\"']", r"get\(\s*[\"']latent[\"']", r"\bpreset\.text\b",
                 r"isinstance\([^)]*\b(ClassTargets|ConceptTargets|SDTargets)\b", r"\.kind\s*[=!]=")
KIND_ALLOWED = ("sfd/tasks/", "sfd/presets.py")


def kind_branches(sources: dict[str, str]) -> list[str]:
    """'path:line: text' of every line outside the allowed files that reads the kind of preset."""
    out = []
    for path, text in sources.items():
        if path.startswith(KIND_ALLOWED):
            continue
        for i, line in enumerate(text.splitlines(), 1):
            code = line.split("#", 1)[0]
            if any(re.search(p, code) for p in KIND_PATTERNS):
                out.append(f"{path}:{i}: {line.strip()}")
    return out


def project_sources() -> dict[str, str]:
    return {str(p.relative_to(ROOT)): p.read_text() for pkg in ("sfd", "orchestration")
            for p in sorted((ROOT / pkg).rglob("*.py"))}


def test_no_import_circles():
    assert Graph(ROOT).cycles() == []


def test_import_circle_is_found():
    """Negative control: the graph sees a circle hidden inside functions."""
    g = Graph(ROOT)
    g.edges["sfd.losses"].add("sfd.loop")                  # the loop imports losses (via iteration); close it
    assert any("sfd.losses" in c and "sfd.loop" in c for c in g.cycles())


def test_imports_at_the_top_except_heavy_ones():
    g = Graph(ROOT)
    assert g.misplaced_inner() == [], "\n".join(f"{m}:{n}: {t}" for m, n, t in g.misplaced_inner())


def test_heavy_rule_is_transitive():
    g = Graph(ROOT)
    assert g.is_heavy("diffusers.pipelines") and g.is_heavy("sfd.export")       # sfd.export imports diffusers
    assert not g.is_heavy("sfd.losses") and not g.is_heavy("math")


def test_preset_kind_is_read_only_inside_sfd_tasks():
    assert kind_branches(project_sources()) == []


def test_kind_branch_detector_catches_a_branch():
    """Negative control: each way of reading the kind, written outside sfd/tasks/, is reported."""
    for line in ("if preset.task == 'sd':", "if preset.text:", "x = preset.extra.get('latent')",
                 "if isinstance(t, ConceptTargets):", "if task.kind == 'classes':"):
        assert kind_branches({"sfd/loop.py": f"def f():\n    {line}\n"}), line
    assert not kind_branches({"sfd/tasks/base.py": "if preset.task == 'sd':\n"})


def test_unique_module_names_where_they_mean_different_things():
    names = {}
    for pkg in ("sfd", "orchestration"):
        for p in (ROOT / pkg).rglob("*.py"):
            if p.name not in ("__init__.py", "base.py"):     # base.py: each package's protocol
                names.setdefault(p.name, []).append(str(p.relative_to(ROOT)))
    assert {n: ps for n, ps in names.items() if len(ps) > 1} == {}


def test_every_module_imports():
    """A moved name that an import inside a function still asks for fails here, not in a user's command."""
    import importlib
    import pkgutil

    import orchestration
    import sfd
    for pkg in (sfd, orchestration):
        for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            if not m.name.endswith("__main__"):                 # `python -m sfd`: runs the CLI
                importlib.import_module(m.name)
    g = Graph(ROOT)
    for mod, _, text, _targets in g.inner:            # the names asked for inside functions exist
        if text.startswith("from ") and " import *" not in text:
            module = importlib.import_module(mod)
            try:
                exec(text, vars(module).copy())
            except ImportError as e:
                raise AssertionError(f"{mod}: {text}: {e}") from None


SCRIPTS = ("orchestration/sweep.py", "orchestration/mlflow_ui_check.py", "benchmarks/capacity.py")


def path_before_project_imports(text: str) -> bool:
    """Whether a script puts the repo on sys.path before its first import of sfd or orchestration."""
    insert = first_import = None
    for node in ast.parse(text).body:
        if isinstance(node, ast.If) and "sys.path.insert" in ast.unparse(node) and insert is None:
            insert = node.lineno
        if isinstance(node, (ast.Import, ast.ImportFrom)) and first_import is None:
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            if any(n.split(".")[0] in ("sfd", "orchestration") for n in names):
                first_import = node.lineno
    return insert is not None and (first_import is None or insert < first_import)


def test_scripts_find_the_repo_before_importing_it():
    """`python orchestration/sweep.py` from a clone works without an install: sys.path first (isort once moved
    the project's imports above it, which only an editable install of the same clone hid)."""
    for script in SCRIPTS:
        assert path_before_project_imports((ROOT / script).read_text()), script
    # negative control: the order isort once produced
    bad = "import sys\nfrom orchestration import cluster\nif __package__ in (None, ''):\n    sys.path.insert(0, '.')\n"
    assert not path_before_project_imports(bad)


def test_sweep_script_runs_from_anywhere(tmp_path):
    """The README's entry point as a user runs it: another folder, no PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, str(ROOT / "orchestration" / "sweep.py"), "--help"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--targets" in r.stdout, r.stderr[-2000:]
