"""The import graph of bridge/, agent/ and model/, read with `ast` (nothing is imported).

Three rules from docs/architecture.md ("The layers"):
- imports go bridge -> agent -> model, never back;
- no module cycles in bridge/ or agent/ (every import counts: a TYPE_CHECKING import or
  one inside a function is still a dependency a reader has to hold in their head);
- every module is named on docs/architecture.md, the map.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ("bridge", "agent", "model")  # top imports bottom, never the other way
NO_CYCLES = ("bridge", "agent")
# model/'s cycles, older than this test: a TYPE_CHECKING import back from a stream to its
# decoder or tokenizer, and v1's tokenizer loading v2 lazily. Fewer is fine; more fails.
KNOWN_CYCLES = {
    frozenset({"model.cosyvoice_decoder", "model.cosyvoice_stream"}),
    frozenset({"model.s3_stream", "model.s3_tokenizer", "model.s3_tokenizer_v2"}),
}


def _modules() -> dict[str, Path]:
    mods = {}
    for layer in LAYERS:
        for path in sorted((ROOT / layer).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _known(name: str) -> str | None:
    """`name` or its nearest enclosing module that is ours; None for anything else."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(name: str, path: Path) -> set[str]:
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(filter(None, (_known(alias.name) for alias in node.names)))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:  # `from . import leg`: the submodule, if it is one
                sub = f"{module}.{alias.name}"
                target = sub if sub in MODULES else _known(module)
                if target:
                    found.add(target)
    found.discard(name)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycles() -> list[frozenset[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []
    counter = 0
    for root in GRAPH:
        if root in index:
            continue
        work = [(root, iter(sorted(GRAPH[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(GRAPH[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(frozenset(component))
    return found


def test_the_graph_sees_the_packages():
    # a guard on the reader itself: a broken walk would pass every rule below
    assert {"bridge.sip.front", "bridge.sip.backends.baresip", "bridge.webrtc.leg", "agent.store"} <= set(MODULES)
    assert "bridge.sip.stack" in GRAPH["bridge.sip.backends.baresip"]
    assert "bridge.webrtc.leg" in GRAPH["bridge.webrtc.signaling"]
    assert "agent.store_memory" in GRAPH["agent.store_factory"]


def test_imports_go_bridge_agent_model_never_back():
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    back = sorted(f"{name} imports {target}" for name, targets in GRAPH.items() for target in targets
                  if rank[target.split(".")[0]] < rank[name.split(".")[0]])
    assert back == []


def test_no_import_cycles():
    cycles = _cycles()
    ours = [sorted(c) for c in cycles if next(iter(c)).split(".")[0] in NO_CYCLES]
    assert ours == [], "modules importing each other in a circle"
    new = [sorted(c) for c in cycles if c not in KNOWN_CYCLES]
    assert new == [], "a new import cycle"


def test_every_module_is_named_in_the_architecture_map():
    text = (ROOT / "docs" / "architecture.md").read_text()
    missing = []
    for name, path in MODULES.items():
        rel = path.relative_to(ROOT)  # bridge/sip/front.py
        in_layer = Path(*rel.parts[1:])  # sip/front.py
        # the path, or the name alone in its area's row (`session.py`, `resample.py`)
        names = [str(rel), f"`{in_layer}`", f"/{in_layer}", f"`{path.name}`"]
        if path.name == "__init__.py":  # a package: its folder
            names = [f"{rel.parent}/", f"`{in_layer.parent}/`"]
        elif len(in_layer.parts) > 1 and not any(p.parent == path.parent and p.name != "__init__.py" and str(p.relative_to(ROOT)) in text
                     for p in MODULES.values()):
            # a package the map names as a whole (model/train/), none of its modules one by one
            names.append(f"{rel.parent}/")
        if not any(n in text for n in names):
            missing.append(str(rel))
    assert missing == [], "add these to docs/architecture.md"
