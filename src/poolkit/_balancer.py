"""Pick algorithms: given the usable nodes, choose one for the next call.

Nodes are anything with `metric.load(now)` and a `weight`. The random source is the
caller's (a `random.Random`), so picks are reproducible in tests.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Sequence
from typing import Generic, Protocol, TypeVar

from ._metric import LoadMetric


class Node(Protocol):
    @property
    def metric(self) -> LoadMetric: ...

    @property
    def weight(self) -> float: ...


N = TypeVar("N", bound=Node)


class PowerOfTwoChoices(Generic[N]):
    """Of two distinct nodes drawn at random (in proportion to weight), the one whose
    load is lower (in-flight calls counted per unit of weight). Mitzenmacher's result: nearly the balance of
    scanning every node for the cost of looking at two, and none of the herding that
    "always the least loaded" causes when many clients see the same numbers."""

    def __init__(self, rng: random.Random) -> None:
        self._random = rng.random
        self._nodes: Sequence[N] = ()
        self._cumulative: list[float] | None = None  # None while every weight is equal

    def update(self, nodes: Sequence[N]) -> None:
        self._nodes = tuple(nodes)
        weights = [n.weight for n in self._nodes]
        self._cumulative = None if len(set(weights)) <= 1 else list(itertools.accumulate(weights))

    def pick(self, now: float) -> N:
        nodes = self._nodes
        count = len(nodes)
        if count == 1:
            return nodes[0]
        if self._cumulative is None:
            first = int(self._random() * count)
            second = int(self._random() * (count - 1))
            if second >= first:
                second += 1
            a, b = nodes[first], nodes[second]
            return a if a.metric.load(now) <= b.metric.load(now) else b
        a = nodes[self._weighted_index()]
        b = nodes[self._weighted_index()]
        if a is b:  # one redraw, then accept: heavy nodes may legitimately meet themselves
            b = nodes[self._weighted_index()]
        return a if _weighted_load(a, now) <= _weighted_load(b, now) else b

    def _weighted_index(self) -> int:
        assert self._cumulative is not None
        return bisect.bisect_right(self._cumulative, self._random() * self._cumulative[-1])


def _weighted_load(node: Node, now: float) -> float:
    """A node's load with its in-flight calls counted per unit of weight:
    cost × (pending / weight + 1) instead of cost × (pending + 1). Under load, pending
    then settles in proportion to weight, so a weight-3 node carries 3× the calls; at
    equal loads the weighted draw decides. (Dividing the whole load by weight on top of
    the weighted draw would apply weights twice: 3:1 became ~60:1.)"""
    metric = node.metric
    pending = metric.pending
    return metric.load(now) * (pending / node.weight + 1.0) / (pending + 1.0)


class RoundRobin(Generic[N]):
    """Each node in turn. With unequal weights, nginx's smooth weighted round robin:
    every pick adds each node's weight to its credit, takes the node with the most
    credit and charges it the total, so a weight-3 node gets 3 of every 4 picks, spread out."""

    def __init__(self, rng: random.Random) -> None:
        self._random = rng
        self._nodes: Sequence[N] = ()
        self._credit: list[float] | None = None
        self._next = 0

    def update(self, nodes: Sequence[N]) -> None:
        self._nodes = tuple(nodes)
        weights = {n.weight for n in self._nodes}
        self._credit = None if len(weights) <= 1 else [0.0] * len(self._nodes)
        # Start at a random place so that many clients do not all hit node 0 first.
        self._next = self._random.randrange(len(self._nodes)) if self._nodes else 0

    def pick(self, now: float) -> N:
        nodes = self._nodes
        credit = self._credit
        if credit is None:
            index = self._next % len(nodes)
            self._next = index + 1
            return nodes[index]
        best = 0
        for i, node in enumerate(nodes):
            credit[i] += node.weight
            if credit[i] > credit[best]:
                best = i
        credit[best] -= sum(n.weight for n in nodes)
        return nodes[best]


Picker = PowerOfTwoChoices[N] | RoundRobin[N]
