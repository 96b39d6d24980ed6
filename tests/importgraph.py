"""The import graph of sfd/ and orchestration/, read with ``ast`` (nothing is imported).

``python tests/importgraph.py`` prints the modules, the import circles and every import left inside a
function; tests/test_architecture.py asserts the rules on the same graph.

The rule for imports inside functions: only a *heavy* import may wait until it is used -- a third-party
package in :data:`HEAVY` (slow to import, or needed by one command or one kind of preset only), or a
module of this project that imports one of them at its top. Everything else is imported at the top.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGES = ("sfd", "orchestration")
# Third-party packages imported where they are used: each costs seconds to import, or serves one command or
# one kind of preset (Ray and MLflow: the sweep and multi-worker runs; diffusers / transformers / tokenizers /
# peft: text-to-image and Stable Diffusion; nudenet / onnxruntime: the nudity judge; scikit-learn: the digits
# data; matplotlib: plots; pandas / pyarrow / s3fs / boto3: tables and remote storage; optuna: the search;
# kubernetes / jsonschema / moto: tests of the cluster manifests and services).
HEAVY = ("ray", "mlflow", "optuna", "diffusers", "transformers", "tokenizers", "peft", "nudenet", "onnxruntime",
         "sklearn", "matplotlib", "pandas", "pyarrow", "s3fs", "boto3", "botocore", "moto", "kubernetes",
         "jsonschema", "kubernetes_validate", "huggingface_hub")


class Graph:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.modules: dict[str, Path] = {}
        for p in sorted(self.root.rglob("*.py")):
            rel = p.relative_to(self.root)
            if rel.parts[0] not in PACKAGES:
                continue
            name = ".".join(rel.with_suffix("").parts)
            self.modules[name.removesuffix(".__init__")] = p
        self.trees = {m: ast.parse(p.read_text()) for m, p in self.modules.items()}
        self.top: dict[str, set[str]] = {m: set() for m in self.modules}       # module-level imports
        self.edges: dict[str, set[str]] = {m: set() for m in self.modules}     # all imports of our modules
        self.inner: list[tuple[str, int, str, list[str]]] = []                # (module, line, text, targets)
        for m, tree in self.trees.items():
            top_ids = {id(n) for n in tree.body}
            for node in ast.walk(tree):
                if not isinstance(node, (ast.Import, ast.ImportFrom)):
                    continue
                targets = self.targets_of(m, node)
                ours = {self._own(t) for t in targets} - {None, m}
                self.edges[m] |= ours
                if id(node) in top_ids:
                    self.top[m] |= set(targets)
                else:
                    self.inner.append((m, node.lineno, ast.unparse(node), targets))

    def targets_of(self, mod: str, node) -> list[str]:
        """Dotted names a statement imports (a name imported from a package counts as its submodule)."""
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        if node.level:
            base = mod.split(".")
            if self.modules[mod].name != "__init__.py":
                base = base[:-1]
            base = base[:len(base) - (node.level - 1)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module
        out = []
        for a in node.names:
            cand = f"{prefix}.{a.name}"
            out.append(cand if cand in self.modules else prefix)
        return out

    def _own(self, name: str) -> str | None:
        while name not in self.modules and "." in name:
            name = name.rsplit(".", 1)[0]
        return name if name in self.modules else None

    def is_heavy(self, name: str, _seen=None) -> bool:
        """A HEAVY package, or one of our modules importing one at its top (directly or through our modules)."""
        if name.split(".")[0] in HEAVY or name in HEAVY:
            return True
        own = self._own(name)
        if own is None:
            return False
        seen = _seen if _seen is not None else set()
        if own in seen:
            return False
        seen.add(own)
        return any(self.is_heavy(t, seen) for t in self.top[own])

    def cycles(self) -> list[list[str]]:
        """Strongly connected components of more than one module (Tarjan)."""
        index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
        sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))

        def visit(v):
            index[v] = low[v] = counter[0]
            counter[0] += 1
            stack.append(v)
            on.add(v)
            for w in self.edges[v]:
                if w not in index:
                    visit(w)
                    low[v] = min(low[v], low[w])
                elif w in on:
                    low[v] = min(low[v], index[w])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))

        for v in self.modules:
            if v not in index:
                visit(v)
        return out

    def misplaced_inner(self) -> list[tuple[str, int, str]]:
        """Imports inside functions that are not heavy."""
        return [(m, line, text) for m, line, text, targets in self.inner
                if not any(self.is_heavy(t) for t in targets)]


def main() -> int:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent
    g = Graph(root)
    print(f"{len(g.modules)} modules, {sum(map(len, g.edges.values()))} import edges between them")
    cyc = g.cycles()
    print(f"import circles: {len(cyc)}")
    for c in cyc:
        print("  " + " <-> ".join(c))
    print(f"imports inside functions: {len(g.inner)} (heavy, allowed: {len(g.inner) - len(g.misplaced_inner())})")
    for m, line, text in g.misplaced_inner():
        print(f"  not heavy: {m}:{line}: {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
