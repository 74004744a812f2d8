"""The arc-standard transition system (Nivre 2004) as Chen & Manning (2014) use it, and its static oracle.

A sentence has words ``1..n``; ``0`` is ROOT, which starts on the stack (stack ``[0]``, buffer
``1..n``). As in Chen & Manning, ``s1`` is the top of the stack, ``s2`` the item below it and ``b1``
the first buffer word.

- SHIFT moves ``b1`` onto the stack.
- LEFT-ARC(l) makes ``s1`` the head of ``s2`` with label ``l`` and removes ``s2``.
- RIGHT-ARC(l) makes ``s2`` the head of ``s1`` with label ``l`` and removes ``s1``.

The parse ends with an empty buffer and stack ``[0]`` after exactly ``2n`` transitions. Two rules keep
every output a single-rooted tree: LEFT-ARC is illegal when ``s2`` is ROOT (ROOT has no head), and
RIGHT-ARC onto ROOT is legal only once the buffer is empty, when the stack is ``[0, s1]``; so exactly
one word, the last one popped, attaches to ROOT. Some transition is legal in every non-final
configuration, so greedy decoding cannot get stuck.

Outputs (``2L + 1`` for ``L`` labels): index 0 is SHIFT, ``1 + l`` is LEFT-ARC(l), ``1 + L + l`` is
RIGHT-ARC(l), ``l`` indexing :attr:`ArcStandard.labels`.

Non-projective trees: arc-standard builds projective trees only, and the static oracle has no
sequence for a non-projective one. Such training sentences are skipped, not projectivised (which
would need label encodings to undo it after parsing); the feature extraction reports how many. On UD
English EWT that is 288 of the 12,544 train sentences (2.3 %) and 31 of the 2,001 dev sentences.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

SHIFT = 0
ROOT = 0


class Configuration:
    """Stack, buffer and the arcs built so far for a sentence of ``n`` words.

    ``heads[i]`` and ``labels[i]`` are the head and label index of word ``i`` (index 0, ROOT, is
    unused), ``-1`` until it is attached. ``left[i]`` and ``right[i]`` are the attached children of
    ``i`` left and right of it, each in increasing word order. The buffer is ``next..n``.
    """

    __slots__ = ("n", "stack", "next", "heads", "labels", "left", "right")

    def __init__(self, n: int) -> None:
        if n < 1:
            raise ValueError(f"a sentence needs at least one word, got {n}")
        self.n = n
        self.stack: list[int] = [ROOT]
        self.next = 1
        self.heads: list[int] = [-1] * (n + 1)
        self.labels: list[int] = [-1] * (n + 1)
        self.left: list[list[int]] = [[] for _ in range(n + 1)]
        self.right: list[list[int]] = [[] for _ in range(n + 1)]

    @property
    def is_final(self) -> bool:
        return self.next > self.n and len(self.stack) == 1



class ArcStandard:
    """Arc-standard transitions over the relation labels ``labels`` (``2L + 1`` outputs)."""

    def __init__(self, labels: Sequence[str]) -> None:
        if len(set(labels)) != len(labels) or not labels:
            raise ValueError(f"labels must be distinct and non-empty, got {list(labels)}")
        self.labels: tuple[str, ...] = tuple(labels)
        self.label_index: dict[str, int] = {label: i for i, label in enumerate(self.labels)}
        self.n_outputs = 2 * len(self.labels) + 1

    def left_arc(self, label: int) -> int:
        """Output index of LEFT-ARC with label index ``label``."""
        return 1 + label

    def right_arc(self, label: int) -> int:
        """Output index of RIGHT-ARC with label index ``label``."""
        return 1 + len(self.labels) + label

    def name(self, transition: int) -> str:
        """Readable name of an output index: ``SHIFT``, ``LEFT-ARC(nsubj)``, ``RIGHT-ARC(obj)``."""
        n_labels = len(self.labels)
        if transition == SHIFT:
            return "SHIFT"
        if 1 <= transition <= n_labels:
            return f"LEFT-ARC({self.labels[transition - 1]})"
        if n_labels < transition < self.n_outputs:
            return f"RIGHT-ARC({self.labels[transition - 1 - n_labels]})"
        raise ValueError(f"transition {transition} outside 0..{self.n_outputs - 1}")

    @staticmethod
    def legal_kinds(config: Configuration) -> tuple[bool, bool, bool]:
        """Whether SHIFT, LEFT-ARC and RIGHT-ARC (any label) are legal in ``config``."""
        depth = len(config.stack)
        buffer_empty = config.next > config.n
        # ROOT is always at the bottom, so s2 is ROOT exactly when the stack holds two items
        return (not buffer_empty, depth > 2, depth > 2 or (depth == 2 and buffer_empty))

    def legal_mask(self, config: Configuration) -> Tensor:
        """Legal outputs of ``config``: bool ``[2L + 1]``."""
        return self.legal_masks([config])[0]

    def legal_masks(self, configs: Sequence[Configuration]) -> Tensor:
        """Legal outputs of each configuration: bool ``[m, 2L + 1]``."""
        kinds = torch.tensor([self.legal_kinds(c) for c in configs], dtype=torch.bool).reshape(-1, 3)
        n_labels = len(self.labels)
        return torch.cat([kinds[:, :1], kinds[:, 1:2].expand(-1, n_labels), kinds[:, 2:].expand(-1, n_labels)], 1)

    def apply(self, config: Configuration, transition: int) -> int:
        """Apply output ``transition`` to ``config`` in place: the word it attached, ``-1`` for SHIFT.

        Raises ValueError when ``transition`` is illegal in ``config``.
        """
        shift, left, right = self.legal_kinds(config)
        n_labels = len(self.labels)
        stack = config.stack
        if transition == SHIFT:
            if not shift:
                raise ValueError("SHIFT with an empty buffer")
            stack.append(config.next)
            config.next += 1
            return -1
        if 1 <= transition <= n_labels:
            if not left:
                raise ValueError(f"LEFT-ARC with stack {stack}")
            head, dependent = stack[-1], stack[-2]
            del stack[-2]
            config.heads[dependent] = head
            config.labels[dependent] = transition - 1
            # children attached earlier lie between dependent and head: dependent is the new leftmost
            config.left[head].insert(0, dependent)
            return dependent
        if n_labels < transition < self.n_outputs:
            if not right:
                raise ValueError(f"RIGHT-ARC with stack {stack} and buffer from {config.next}")
            dependent = stack.pop()
            head = stack[-1]
            config.heads[dependent] = head
            config.labels[dependent] = transition - 1 - n_labels
            # right children attached earlier precede dependent: it is the new rightmost
            config.right[head].append(dependent)
            return dependent
        raise ValueError(f"transition {transition} outside 0..{self.n_outputs - 1}")

    def oracle(
        self, config: Configuration, heads: Sequence[int], labels: Sequence[int], n_children: Sequence[int]
    ) -> int:
        """The static oracle's transition towards the gold tree.

        ``heads[i]`` and ``labels[i]`` are the gold head and label index of word ``i`` and
        ``n_children[i]`` its gold number of children, all indexed ``0..n`` (index 0 unused for
        heads and labels). LEFT-ARC when ``s2``'s gold head is ``s1``; RIGHT-ARC when ``s1``'s gold head
        is ``s2`` and all of ``s1``'s children are attached (it leaves the stack for good, so must wait
        for them); else SHIFT.
        Raises ValueError when that SHIFT is impossible, which happens only for a non-projective or
        malformed tree.
        """
        stack = config.stack
        if len(stack) >= 2:
            s1, s2 = stack[-1], stack[-2]
            if s2 != ROOT and heads[s2] == s1:
                return self.left_arc(labels[s2])
            if heads[s1] == s2 and len(config.left[s1]) + len(config.right[s1]) == n_children[s1]:
                if s2 != ROOT or config.next > config.n:
                    return self.right_arc(labels[s1])
        if config.next > config.n:
            raise ValueError("the oracle is stuck: the gold tree is not projective or not a single-rooted tree")
        return SHIFT


def is_projective(heads: Sequence[int]) -> bool:
    """Whether the tree ``heads`` (``heads[i - 1]`` = head of word ``i``, 0 = ROOT) is projective.

    Projective, with ROOT before the first word: every word's subtree covers a contiguous span of
    word positions, which is the same as no two arcs crossing. Raises ValueError when ``heads`` is not
    a tree on ROOT.
    """
    n = len(heads)
    children: list[list[int]] = [[] for _ in range(n + 1)]
    for word, head in enumerate(heads, start=1):
        if not 0 <= head <= n:
            raise ValueError(f"head {head} of word {word} outside 0..{n}")
        children[head].append(word)
    order = [ROOT]  # breadth first from ROOT: every node after its head
    for node in order:
        order.extend(children[node])
    if len(order) != n + 1:
        raise ValueError(f"heads {list(heads)} do not form a tree on ROOT (a cycle)")
    low, high, size = list(range(n + 1)), list(range(n + 1)), [1] * (n + 1)
    for node in reversed(order[1:]):  # children before heads
        if high[node] - low[node] + 1 != size[node]:
            return False
        head = heads[node - 1]
        low[head] = min(low[head], low[node])
        high[head] = max(high[head], high[node])
        size[head] += size[node]
    return True


def gold_transitions(system: ArcStandard, heads: Sequence[int], labels: Sequence[int]) -> list[int]:
    """The oracle's transition sequence (``2n`` outputs) for a projective tree.

    ``heads[i - 1]`` and ``labels[i - 1]`` are the head and label index of word ``i``.
    """
    config = Configuration(len(heads))
    gold_heads, gold_labels, n_children = oracle_arrays(heads, labels)
    sequence = []
    while not config.is_final:
        transition = system.oracle(config, gold_heads, gold_labels, n_children)
        system.apply(config, transition)
        sequence.append(transition)
    return sequence


def oracle_arrays(heads: Sequence[int], labels: Sequence[int]) -> tuple[list[int], list[int], list[int]]:
    """Gold heads, label indices and child counts indexed ``0..n``, as :meth:`ArcStandard.oracle` takes them."""
    gold_heads, gold_labels = [-1, *heads], [-1, *labels]
    n_children = [0] * (len(heads) + 1)
    for head in heads:
        n_children[head] += 1
    return gold_heads, gold_labels, n_children
