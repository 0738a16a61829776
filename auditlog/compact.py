"""A compact range: the root of a growing tree in O(log n) memory."""

from __future__ import annotations

from auditlog.merkle import node_hash, root_hash

__all__ = ["CompactRange"]


class CompactRange:
    """Holds only the right-edge perfect subtrees; `root()` folds them (RFC 9162 MTH)."""

    def __init__(self) -> None:
        self.size = 0
        self._stack: list[bytes] = []  # subtree roots, highest level first

    @classmethod
    def resume(cls, size: int, subtrees: list[bytes]) -> CompactRange:
        """Continue from the roots of the perfect subtrees that make up [0, size), left to right."""
        if len(subtrees) != size.bit_count():
            raise ValueError(f"a range of size {size} has {size.bit_count()} subtrees, got {len(subtrees)}")
        cr = cls()
        cr.size, cr._stack = size, list(subtrees)
        return cr

    @property
    def subtrees(self) -> list[bytes]:
        """The roots of the perfect subtrees that make up [0, size), left to right."""
        return list(self._stack)

    def append(self, leaf_hash: bytes) -> None:
        h, idx = leaf_hash, self.size
        while idx & 1:  # a right child: merge with the left sibling on the stack
            h = node_hash(self._stack.pop(), h)
            idx >>= 1
        self._stack.append(h)
        self.size += 1

    def root(self) -> bytes:
        if not self._stack:
            return root_hash([])
        r = self._stack[-1]
        for left in reversed(self._stack[:-1]):
            r = node_hash(left, r)
        return r
