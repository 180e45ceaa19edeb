"""Draw the DAG of a definition as Mermaid or Graphviz dot."""
from __future__ import annotations

import re

from pipeline.dag import steps_of, topological_order

FORMATS = ("mermaid", "dot")
MERMAID_SHAPES = {"Condition": '{"%s"}', "Callback": '(["%s"])', "Fail": '[["%s"]]'}


def _ancestors(nodes: dict, order: list[str]) -> dict[str, set[str]]:
    ancestors: dict[str, set[str]] = {}
    for name in order:
        ancestors[name] = set()
        for dependency in nodes[name].depends_on:
            ancestors[name] |= {dependency} | ancestors[dependency]
    return ancestors


def _edges(document: dict) -> tuple[dict, list[tuple[str, str, str]]]:
    """Edges of the transitive reduction: A -> C is left out when A -> B -> C exists."""
    nodes = steps_of(document)
    order = topological_order(nodes)
    ancestors = _ancestors(nodes, order)
    edges = []
    for name in order:
        node = nodes[name]
        direct = {d for d in node.depends_on if not any(d in ancestors[other] for other in node.depends_on)}
        for dependency in sorted(direct, key=order.index):
            label = node.branch_of[1] if node.branch_of and node.branch_of[0] == dependency else ""
            edges.append((dependency, name, label))
    return nodes, edges


def _mermaid_id(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


def mermaid(document: dict) -> str:
    nodes, edges = _edges(document)
    lines = ["flowchart TD"]
    for name, node in nodes.items():
        shape = MERMAID_SHAPES.get(node.type, '["%s"]') % f"{name}<br/><i>{node.type}</i>"
        lines.append(f"    {_mermaid_id(name)}{shape}")
    for source, target, label in edges:
        arrow = f"-- {label} -->" if label else "-->"
        lines.append(f"    {_mermaid_id(source)} {arrow} {_mermaid_id(target)}")
    return "\n".join(lines) + "\n"


def dot(document: dict) -> str:
    nodes, edges = _edges(document)
    lines = ["digraph pipeline {", "    rankdir=TB;", "    node [shape=box, fontname=Helvetica];"]
    for name, node in nodes.items():
        shape = ", shape=diamond" if node.type == "Condition" else ""
        lines.append(f'    "{name}" [label="{name}\\n({node.type})"{shape}];')
    for source, target, label in edges:
        attributes = f' [label="{label}"]' if label else ""
        lines.append(f'    "{source}" -> "{target}"{attributes};')
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_graph(document: dict, fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"unknown graph format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return mermaid(document) if fmt == "mermaid" else dot(document)
