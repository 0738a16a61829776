"""The block protocol of audio transforms, and the pipeline FetchClip runs between decode and encode.

A transform sees the clip as float32 blocks shaped (frames, channels), in order,
each with `offset`, the absolute frame index of its first frame in the clip. A
transform that needs look-ahead (the disguise's overlapping analysis frames)
may return fewer frames than it was given, and then hands the rest back from
`flush()` at the end; its output stays aligned: the k-th frame it returns is
frame k of the clip, and in total it returns as many frames as it was given.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Transform(Protocol):
    def process(self, block: np.ndarray, offset: int) -> np.ndarray:
        """`block` (frames, channels) float32, starting at clip frame `offset`; the transformed frames."""
        ...


@runtime_checkable
class BufferingTransform(Transform, Protocol):
    def flush(self) -> np.ndarray:
        """The frames still held back, once the last block has been processed."""
        ...


class Gain:
    """A trivial transform (scale every sample), for tests of the pipeline and of FetchClip's hook."""

    name = "gain"

    def __init__(self, factor: float) -> None:
        self._factor = np.float32(factor)

    def process(self, block: np.ndarray, offset: int) -> np.ndarray:
        return block * self._factor


class Pipeline:
    """Transforms applied in order; the output of one is the input of the next, block by block."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = tuple(transforms)

    def __bool__(self) -> bool:
        return bool(self.transforms)

    def run(self, blocks: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        offsets = [0] * len(self.transforms)  # frames each transform has been given so far

        def through(block: np.ndarray, first: int) -> np.ndarray:
            for i in range(first, len(self.transforms)):
                if not len(block):
                    break
                given = len(block)
                block = self.transforms[i].process(block, offsets[i])
                offsets[i] += given
            return block

        for block in blocks:
            out = through(block, 0)
            if len(out):
                yield out
        for i, transform in enumerate(self.transforms):
            if isinstance(transform, BufferingTransform):
                out = through(transform.flush(), i + 1)
                if len(out):
                    yield out
