"""Channel layouts: which channel of which space each element of a tensor axis carries.

A *space* is the set of channels one producer creates (a Conv's output channels, a MatMul's
output features). A tensor that carries channels has one tracked ``axis``; element ``e`` of that
axis holds channels ``chan[e] .. chan[e] + fold - 1`` of space ``space[e]``:

- ``fold == 1`` for ordinary channels; an element may repeat (Flatten of NCHW repeats each
  channel H*W times) and the order may be permuted (channel shuffle) or concatenated (Concat).
- ``fold > 1`` after a Reshape splits channels into heads: element ``h`` is a whole head of
  ``fold`` channels, whose within-head index lives on axis ``inner``.
- ``space == FIXED`` marks elements that are never removed (a Concat with a graph input).

Removing a set of channels removes exactly the elements whose channels are removed: every
op rule derives its edits from these element arrays, so Concat offsets, Flatten strides and
shuffles need no special cases at surgery time.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

FIXED = -1


@dataclass(frozen=True, eq=False)
class Layout:
    """The channel content of one tensor axis (see module docstring)."""

    axis: int
    space: np.ndarray
    chan: np.ndarray
    fold: int = 1
    inner: int | None = None

    def __len__(self) -> int:
        return int(self.space.shape[0])

    @staticmethod
    def fresh(space: int, n: int, axis: int) -> Layout:
        return Layout(axis, np.full(n, space, dtype=np.int64), np.arange(n, dtype=np.int64))

    @staticmethod
    def fixed(n: int, axis: int) -> Layout:
        return Layout(axis, np.full(n, FIXED, dtype=np.int64), np.zeros(n, dtype=np.int64))

    def spaces(self) -> set[int]:
        return {int(s) for s in np.unique(self.space) if s != FIXED}

    def moved(self, axis: int, inner: int | None = None) -> Layout:
        return replace(self, axis=axis, inner=inner if self.fold > 1 else None)

    def take(self, index: np.ndarray) -> Layout:
        return replace(self, space=self.space[index], chan=self.chan[index])

    def keep_mask(self, removed: dict[int, np.ndarray]) -> np.ndarray:
        """True for elements none of whose channels ``removed[space]`` (bool per channel) marks."""
        keep = np.ones(len(self), dtype=bool)
        for s in self.spaces():
            dead = removed.get(s)
            if dead is None:
                continue
            sel = self.space == s
            hit = np.zeros(int(sel.sum()), dtype=bool)
            for j in range(self.fold):
                hit |= dead[self.chan[sel] + j]
            keep[sel] = ~hit
        return keep


def concat(layouts: list[Layout], axis: int) -> Layout | None:
    """Concatenate layouts along their shared tracked axis; None if their folds differ."""
    folds = {lay.fold for lay in layouts}
    if len(folds) != 1:
        return None
    return Layout(
        axis,
        np.concatenate([lay.space for lay in layouts]),
        np.concatenate([lay.chan for lay in layouts]),
        layouts[0].fold,
        None,
    )


def merge_axes(lay: Layout, dims: list[int], pos: int, inner_pos: int | None) -> Layout | None:
    """Layout of the single axis made by merging ``dims`` (C order), tracked axis at ``pos``.

    Flatten repeats each channel over the trailing dims; merging a head axis with its
    within-head axis (``inner_pos``) expands each head back into its channels.
    """
    if lay.fold > 1 and inner_pos is None:
        return None
    grids = np.indices(dims).reshape(len(dims), -1)
    tracked = grids[pos]
    space = lay.space[tracked]
    chan = lay.chan[tracked]
    if lay.fold > 1:
        chan = chan + grids[inner_pos]
    return Layout(0, space, chan)


def split_axis(lay: Layout, dims: list[int]) -> tuple[str, Layout, int] | None:
    """Split the tracked axis into ``dims`` (C order).

    Returns ``(kind, layout, position)``:

    - ``"same"``: one non-unit dim (the reshape only adds unit axes);
    - ``"unflatten"``: ``[C, k]`` where each block of k elements repeats one channel;
    - ``"heads"``: ``[heads, k]`` where each block is an aligned run of k channels of one
      space; the layout gets ``fold = k`` and the caller bundles each head into one unit;
    - ``"rows"``: any other ``[g, k]``: the k-axis is tracked with the layout of the first
      block, and the caller joins the g blocks element-wise (channel shuffle).
    - ``"packed"``: ``[g, heads, k]`` where each of the g blocks splits into heads as above (a
      packed QKV projection, ``[3*E] -> [3, H, D]``): the heads axis is tracked with the first
      block's heads (``fold = k``); the caller joins the g blocks element-wise, so head h of Q,
      K and V is one unit, and bundles each head.
    None when the split has more than three non-unit dims, three that are not packed heads, or
    the layout already holds heads.
    """
    big = [i for i, d in enumerate(dims) if d != 1]
    if len(big) <= 1:
        return "same", lay, (big[0] if big else 0)
    if len(big) == 3 and lay.fold == 1:
        g, h, k = (dims[i] for i in big)
        blocks = [split_axis(row, [h, k]) for row in block_rows(lay, g)]
        if any(b is None or b[0] != "heads" for b in blocks):
            return None
        heads = blocks[0][1]
        return "packed", Layout(0, heads.space, heads.chan, fold=k, inner=big[2]), big[1]
    if len(big) != 2 or lay.fold != 1:
        return None
    outer, inner = big
    k = dims[inner]
    space = lay.space.reshape(-1, k)
    chan = lay.chan.reshape(-1, k)
    same_space = bool((space == space[:, :1]).all())
    if same_space and (chan == chan[:, :1]).all():
        return "unflatten", Layout(0, space[:, 0].copy(), chan[:, 0].copy()), outer
    run = chan[:, :1] + np.arange(k)
    one_space = bool((space == space[0, 0]).all())
    aligned = (chan == run).all() and (chan[:, 0] % k == 0).all()
    if one_space and aligned and not (space[:, 0] == FIXED).any():
        heads = Layout(0, space[:, 0].copy(), chan[:, 0].copy(), fold=k, inner=inner)
        return "heads", heads, outer
    return "rows", Layout(0, space[0].copy(), chan[0].copy()), inner


def block_rows(lay: Layout, rows: int) -> list[Layout]:
    """The ``rows`` equal consecutive blocks of a layout (for ``split_axis`` kind ``rows``)."""
    k = len(lay) // rows
    return [lay.take(np.arange(r * k, (r + 1) * k)) for r in range(rows)]
