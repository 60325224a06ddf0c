"""Mixed precision: the fewest layers to keep in float, chosen from the diagnosis's ranking.

Each ranked tensor gives an *island*: the nodes that must stay in float so that the tensor is never
quantized (its producers back to the compute layer, and its consumers). The search keeps the islands of
the worst tensors in float, the first ``k`` of the ranking for growing ``k`` (1, 2, 3, 4, 6, 8, 11, ...:
greedy in ranking order, about 1.4x more each step so a deep model needs few steps), bisects between the
last ``k`` that failed and the first that passed, then prunes back: each chosen island is dropped again when
the gate still passes without it. Every step is a real quantization judged by the real gate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from edgeml.compile.recover_graph import COMPUTE_OPS, GraphIndex, float_island, layer_macs

__all__ = ["FloatLayer", "Island", "float_layers", "islands", "search_float_set"]


@dataclass(frozen=True)
class Island:
    """The nodes to keep in float for one blamed tensor."""

    tensor: str
    nodes: tuple[str, ...]


@dataclass(frozen=True)
class FloatLayer:
    """A compute layer kept in float, and its share of the model's multiply-accumulates."""

    name: str
    op_type: str
    compute_share: float

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "op_type": self.op_type, "compute_share": round(self.compute_share, 6)}


def islands(tensors: Sequence[str], model: Any, *, excluded: Sequence[str] = ()) -> list[Island]:
    """The islands of ``tensors`` (ranked worst first), without repeats or nodes the user already excluded."""
    g = GraphIndex(model)
    seen: set[tuple[str, ...]] = set()
    result = []
    for tensor in tensors:
        nodes = tuple(n for n in float_island(tensor, g) if n not in excluded)
        if nodes and nodes not in seen:
            seen.add(nodes)
            result.append(Island(tensor, nodes))
    return result


def float_layers(nodes: Sequence[str], model: Any) -> list[FloatLayer]:
    """The compute layers among ``nodes`` with their share of compute (0 when the model's is unknown)."""
    macs = layer_macs(model)
    total = sum(macs.values())
    ops = {n.name: n.op_type for n in model.graph.node}
    return [FloatLayer(n, ops[n], macs[n] / total if total else 0.0) for n in nodes if ops.get(n) in COMPUTE_OPS
            and n in macs]


def _union(chosen: Sequence[Island]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(n for island in chosen for n in island.nodes))


def _steps(count: int) -> list[int]:
    steps, k = [], 1
    while k < count:
        steps.append(k)
        k = max(k + 1, round(k * 1.4))
    return [*steps, count] if count else []


def search_float_set(candidates: Sequence[Island], passes: Callable[[tuple[str, ...]], bool | None]
                     ) -> tuple[str, ...] | None:
    """The smallest float set found, or None when even every island together fails.

    Args:
        candidates: Islands, worst first.
        passes: Quantizes with these nodes in float and runs the gate: True passes, False fails, None when
            the time budget ran out (the search stops and returns what passed so far, if anything).
    """
    judged: dict[frozenset[str], bool | None] = {}

    def once(nodes: tuple[str, ...]) -> bool | None:  # two prefixes can add up to the same nodes: judge once
        key = frozenset(nodes)
        if key not in judged:
            judged[key] = passes(nodes)
        return judged[key]

    best: list[Island] | None = None
    low = 0  # the largest prefix known to fail
    for k in _steps(len(candidates)):
        verdict = once(_union(candidates[:k]))
        if verdict is None:
            return None
        if verdict:
            best = list(candidates[:k])
            break
        low = k
    if best is None:
        return None
    high = len(best)
    while high - low > 1:  # bisect for the shortest passing prefix
        mid = (low + high) // 2
        verdict = once(_union(candidates[:mid]))
        if verdict is None:
            return _union(best)
        if verdict:
            high, best = mid, list(candidates[:mid])
        else:
            low = mid
    for island in list(best):  # prune back: drop each island the gate passes without
        if len(best) == 1:
            break
        trial = [i for i in best if i is not island]
        verdict = once(_union(trial))
        if verdict is None:
            break
        if verdict:
            best = trial
    return _union(best)
