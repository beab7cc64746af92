"""Symmetric n x n matrices stored by the blocks on and above their diagonal.

Every kernel matrix is symmetric, so the engine keeps only part of each. ``BlockLayout`` halves
the matrix ``depth`` times: the 2^depth diagonal blocks of side n / 2^depth (the leaves) are
kept whole, and at each level k = 1..depth the 2^(k-1) blocks of side n / 2^k just above the
diagonal of their parent stand for themselves and their mirror images below it. Depth 2:

    D0 U0 |  V          packed: [D0 D1 D2 D3 | U0 U1 | V]
       D1 |             (leaves, then the upper blocks level by level, finest first)
    ------+------
          | D2 U1       5/8 of the n² values (1/2 + 1/2^(depth+1) in general)
          |    D3

Then <K, L> = <leaves of K, leaves of L> + 2 <upper blocks of K, upper blocks of L>, so the
float64 product of all layer pairs reads 5/8 of the values it reads for whole matrices, and a
Gram of features needs only these blocks: one batched product per level
(``kernels.packed_gram``). BLAS has no batched symmetric product (syrk) that torch exposes, and
its products would not write this layout; hence this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

#: Smallest leaf side: halving further makes the Gram's products too small to run near the
#: machine's peak (on the 2-core AMD EPYC VM, leaves of 64 and 32 cost the same at n = 256).
MIN_LEAF = 64
#: Deepest layout: 9/16 of the values at depth 3, against 5/8 at depth 2; deeper is not worth
#: its smaller products.
MAX_DEPTH = 3


@dataclass(frozen=True)
class BlockLayout:
    """How a symmetric n x n matrix is packed into ``size`` values (see the module docstring).

    Attributes:
        n: The matrix side (examples in a batch).
        depth: How many times it is halved; 0 keeps the whole matrix (row-major).
    """

    n: int
    depth: int = 0
    #: (offset, count, side) of each level's upper blocks, finest first; set from n and depth.
    spans: tuple[tuple[int, int, int], ...] = field(init=False, repr=False, compare=False)
    #: Values in a packed matrix; set from n and depth.
    size: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.n < 1 or self.depth < 0 or self.n % 2**self.depth:
            raise ValueError(f"no block layout of depth {self.depth} for n = {self.n}")
        spans, offset = [], self.diag_size
        for k in range(self.depth, 0, -1):
            count, side = 2 ** (k - 1), self.n >> k
            spans.append((offset, count, side))
            offset += count * side * side
        # Frozen: computed once here, read for every Gram.
        object.__setattr__(self, "spans", tuple(spans))
        object.__setattr__(self, "size", offset)

    @classmethod
    def for_size(cls, n: int) -> BlockLayout:
        """The deepest layout whose leaves have at least ``MIN_LEAF`` rows."""
        depth = 0
        while depth < MAX_DEPTH and n % 2 ** (depth + 1) == 0 and n >> (depth + 1) >= MIN_LEAF:
            depth += 1
        return cls(n, depth)

    @property
    def leaves(self) -> int:
        """Number of diagonal blocks kept whole."""
        return 1 << self.depth

    @property
    def leaf(self) -> int:
        """Side of a leaf."""
        return self.n >> self.depth

    @property
    def diag_size(self) -> int:
        """Values in the leaves, which count once; the rest count twice."""
        return self.n * self.leaf

    def levels(self) -> list[tuple[int, int]]:
        """(count, side) of each level's upper blocks, finest first."""
        return [(count, side) for _, count, side in self.spans]


def packed_blocks(packed: Tensor, layout: BlockLayout) -> tuple[Tensor, list[Tensor]]:
    """Views of packed matrices (..., size).

    Returns:
        The leaves (..., leaves, leaf, leaf) and each level's upper blocks (..., count, side,
        side), finest first.
    """
    leaves = packed[..., : layout.diag_size].unflatten(
        -1, (layout.leaves, layout.leaf, layout.leaf)
    )
    uppers = [
        packed[..., start : start + count * side * side].unflatten(-1, (count, side, side))
        for start, count, side in layout.spans
    ]
    return leaves, uppers


def full_blocks(full: Tensor, layout: BlockLayout) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """The same blocks as views of whole matrices (..., n, n), and the uppers' mirror images.

    Returns:
        The leaves (..., leaves, leaf, leaf), each level's upper blocks and each level's lower
        blocks (their transposes), (..., count, side, side), finest first.
    """
    grid = full.unflatten(-1, (layout.leaves, layout.leaf)).unflatten(
        -3, (layout.leaves, layout.leaf)
    )
    leaves = grid.diagonal(dim1=-4, dim2=-2).movedim(-1, -3)  # (..., leaves, leaf, leaf)
    uppers: list[Tensor] = []
    lowers: list[Tensor] = []
    for count, side in layout.levels():
        halves = full.unflatten(-1, (count, 2, side)).unflatten(-4, (count, 2, side))
        # halves: (..., count, 2, side, count, 2, side); a block pairs halves of the same parent
        for out, (row, col) in ((uppers, (0, 1)), (lowers, (1, 0))):
            block = halves.select(-2, col).select(-4, row)  # (..., count, side, count, side)
            out.append(block.diagonal(dim1=-4, dim2=-2).movedim(-1, -3))
    return leaves, uppers, lowers


def pack(full: Tensor, layout: BlockLayout, out: Tensor | None = None) -> Tensor:
    """Packs symmetric matrices (..., n, n) into ``out`` (..., size), converting its dtype.

    Only the leaves and the upper blocks are read: a matrix that is not exactly symmetric is
    taken as its upper part and that part's mirror image.
    """
    if out is None:
        out = full.new_empty((*full.shape[:-2], layout.size))
    leaves, uppers = packed_blocks(out, layout)
    src_leaves, src_uppers, _ = full_blocks(full, layout)
    leaves.copy_(src_leaves)
    for dst, src in zip(uppers, src_uppers, strict=True):
        dst.copy_(src)
    return out


def unpack(packed: Tensor, layout: BlockLayout) -> Tensor:
    """The whole symmetric matrices (..., n, n) of packed ones (..., size)."""
    full = packed.new_empty((*packed.shape[:-1], layout.n, layout.n))
    leaves, uppers = packed_blocks(packed, layout)
    dst_leaves, dst_uppers, dst_lowers = full_blocks(full, layout)
    dst_leaves.copy_(leaves)
    for block, upper, lower in zip(uppers, dst_uppers, dst_lowers, strict=True):
        upper.copy_(block)
        lower.copy_(block.mT)
    return full
