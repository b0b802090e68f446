"""Fan-out groups: decoding requests that share a cached prefix, found in the radix tree.

A request holds a lock on the radix-tree node where its cached tokens end, so the
path from the root to that node is its prefix, and two requests whose paths share
nodes read the same KV slots for those tokens. The points of one skeleton answer
are such a group: they all continue the question+skeleton prefix. Attention over
the shared part can then be computed once for the whole group (cascade attention,
:mod:`sot_kernels.cascade`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from engine.prefix_cache import TreeNode
from engine.request import Request


@dataclass(frozen=True)
class PrefixGroup:
    """``members`` (indices into the decode list) share their first ``prefix_len`` KV slots."""

    members: tuple[int, ...]
    prefix_len: int


def _path(node: TreeNode | None) -> list[TreeNode]:
    """The radix-tree nodes from just below the root down to ``node``."""
    path = []
    while node is not None and node.parent is not None:
        path.append(node)
        node = node.parent
    path.reverse()
    return path


def find_prefix_groups(decodes: Sequence[Request], min_tokens: int) -> list[PrefixGroup]:
    """Groups of at least two decoding requests sharing at least ``min_tokens`` cached
    tokens: requests are grouped by the first node of their path, and a group's prefix
    is the longest path all its members share."""
    by_first: dict[int, list[tuple[int, list[TreeNode]]]] = {}
    for i, req in enumerate(decodes):
        path = _path(req.cache_node)
        if path:
            by_first.setdefault(id(path[0]), []).append((i, path))
    groups = []
    for members in by_first.values():
        if len(members) < 2:
            continue
        shared = 0
        for depth, node in enumerate(members[0][1]):
            if any(len(p) <= depth or p[depth] is not node for _, p in members):
                break
            shared += len(node.key)
        # the shared nodes cover at most each member's cached tokens, so every member
        # keeps at least its new token outside the prefix
        if shared >= min_tokens:
            groups.append(PrefixGroup(tuple(i for i, _ in members), shared))
    return groups
