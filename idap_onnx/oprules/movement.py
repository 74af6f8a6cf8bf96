"""Data movement: Reshape, Flatten, Transpose, Squeeze/Unsqueeze, Concat, Split, Slice, Gather,
Expand, Pad, Resize, Tile, Shape.

These ops move the channel axis (Transpose), offset channels (Concat, Split, Slice), stride
them (Flatten repeats each channel over H*W; a Reshape into heads folds ``head_dim`` channels
into one element) or permute them (channel shuffle). The element arrays of ``Layout`` carry all
of it, so the edits are only the constants that spell sizes: Reshape shapes, Split sizes, Slice
bounds, Resize sizes.

A packed QKV projection reshaped to ``[3, H, D]`` splits into three blocks of heads whose
head h is one unit (``layout.split_axis`` kind ``packed``). A split whose outer axis is later
summed or softmaxed over (ResNeSt's radix), or whose row length is the split tensor's own
width over a constant, is rows joined element-wise, not heads. A reshape that moves the
channel axis as a factor of a merged axis (MobileViT's patch unfold ``[B, C, H, W] ->
[B*C*nh, ph, nw, pw]`` and fold) is cut into common factors (``_reshape_factors``). Torch's
legacy MHA merges the batch with the heads, ``bsz * num_heads``: the constant factor becomes
the kept count (edit ``SCALED``). A Reshape target entry read at
run time from *another* tensor's channel count (``C = x.shape[-1]`` of the residual in Swin's
and PVT's legacy exports) is resolved by the Reshape itself: a channel entry becomes the kept
count, a constant (edit ``PINNED``); a head size ``C // H`` keeps ``x``'s width
(``AnalysisContext.check_deferred``).
"""

from __future__ import annotations

import numpy as np
import onnx

from idap_onnx.dependency import (
    PINNED,
    RESHAPE_DIM,
    SCALED,
    SLICE_BOUNDS,
    SPLIT_SIZES,
    AnalysisContext,
)
from idap_onnx.graph import attr
from idap_onnx.layout import Layout, block_rows, concat, merge_axes, split_axis
from idap_onnx.oprules.base import register
from idap_onnx.oprules.conv_gemm import embedding
from idap_onnx.oprules.elementwise import couple_inputs, passthrough
from idap_onnx.oprules.shape_values import partial_value


def _axes(node: onnx.NodeProto, ctx: AnalysisContext, input_index: int) -> list[int] | None:
    """Axes given as attribute (older opsets) or as a constant input (newer opsets)."""
    axes = attr(node, "axes", None)
    if axes is None and len(node.input) > input_index and node.input[input_index]:
        value = ctx.const(node.input[input_index])
        axes = None if value is None else [int(a) for a in np.atleast_1d(value)]
    return None if axes is None else list(axes)


def _moved(ctx: AnalysisContext, node: onnx.NodeProto, lay: Layout, mapping: dict[int, int]):
    """Set output 0 to ``lay`` with axes renumbered by ``mapping`` (None: axis dropped)."""
    axis = mapping.get(lay.axis)
    inner = mapping.get(lay.inner) if lay.inner is not None else None
    if axis is None or (lay.inner is not None and inner is None):
        ctx.decline(node, f"{node.op_type} '{node.name}' removes the channel axis")
        return
    ctx.set(node.output[0], lay.moved(axis, inner), ctx.nonzero(node.input[0]))


@register("Transpose")
def transpose(node: onnx.NodeProto, ctx: AnalysisContext) -> None:
    """Transpose(perm): the channel axis a moves to perm.index(a)."""
    lay = ctx.layout(node.input[0])
    if lay is None:
        return
    rank = ctx.rank(node.input[0])
    perm = attr(node, "perm", None) or list(reversed(range(rank or 0)))
    _moved(ctx, node, lay, {int(p): i for i, p in enumerate(perm)})


@register("Squeeze")
def squeeze(node: onnx.NodeProto, ctx: AnalysisContext) -> None:
    """Squeeze(axes): axes after the channel axis shift down; squeezing it is declined."""
    lay = ctx.layout(node.input[0])
    rank = ctx.rank(node.input[0])
    if lay is None or rank is None:
        return
    axes = _axes(node, ctx, 1)
    if axes is None:
        shape = ctx.shape(node.input[0]) or ()
        axes = [i for i, d in enumerate(shape) if d == 1]
    axes = sorted(a % rank for a in axes)
    keep = [i for i in range(rank) if i not in axes]
    _moved(ctx, node, lay, {a: i for i, a in enumerate(keep)})


@register("Unsqueeze")
def unsqueeze(node: onnx.NodeProto, ctx: AnalysisContext) -> None:
    """Unsqueeze(axes): the channel axis shifts past the inserted axes."""
    lay = ctx.layout(node.input[0])
    rank = ctx.rank(node.input[0])
    axes = _axes(node, ctx, 1)
    if lay is None or rank is None:
        return
    if axes is None:
        ctx.decline(node, f"Unsqueeze '{node.name}': axes are not constant")
        return
    out_rank = rank + len(axes)
    new = {a % out_rank for a in axes}
    old = [i for i in range(out_rank) if i not in new]
    _moved(ctx, node, lay, dict(enumerate(old)))


def _match_ends(a: tuple, b: tuple) -> tuple[int, int]:
    """Lengths of the equal leading and trailing parts of two shapes (known dims only)."""
    lead = 0
    while lead < min(len(a), len(b)) and a[lead] == b[lead] and a[lead] is not None:
        lead += 1
    trail = 0
    while (
        trail < min(len(a), len(b)) - lead
        and a[-1 - trail] == b[-1 - trail]
        and a[-1 - trail] is not None
    ):
        trail += 1
    return lead, trail


@register("Reshape", since=5)
def reshape(node: onnx.NodeProto, ctx: AnalysisContext) -> None:
    """Reshape: equal leading/trailing dims keep the channel axis; the middle part merges
    (Flatten, heads back to features) or splits (features into heads, channel shuffle) it.
    Unit dims in the middle are ignored; the new channel dim in the target shape must be a
    constant (rewritten), -1/0, or computed at run time from the channel dim itself."""
    lay = ctx.layout(node.input[0])
    if lay is None:
        return
    src, dst = ctx.shape(node.input[0]), ctx.shape(node.output[0])
    if src is None or dst is None:
        ctx.decline(node, f"Reshape '{node.name}': shapes unknown")
        return
    src = tuple(len(lay) if i == lay.axis else d for i, d in enumerate(src))
    dst = _solve_unknown_dim(src, dst)
    lead, trail = _match_ends(src, dst)
    nz = ctx.nonzero(node.input[0])
    if lay.axis < lead or lay.axis >= len(src) - trail:
        axis = lay.axis if lay.axis < lead else lay.axis + len(dst) - len(src)
        inner = lay.inner
        if inner is not None:
            if lead <= inner < len(src) - trail:
                ctx.decline(node, f"Reshape '{node.name}' separates a head from its channels")
                return
            inner = inner if inner < lead else inner + len(dst) - len(src)
            _head_size_known(node, ctx, inner)  # notes a head size read from another width
        if _reshape_edit(node, ctx, axis):
            ctx.set(node.output[0], lay.moved(axis, inner), nz)
        return
    mid_in, mid_out = list(src[lead : len(src) - trail]), list(dst[lead : len(dst) - trail])
    if not all(isinstance(d, int) for d in mid_in + mid_out):
        ctx.decline(node, f"Reshape '{node.name}': symbolic dims around the channel axis")
        return
    if _reshape_middle(node, ctx, lay, nz, mid_in, mid_out, lead, lead):
        return
    run = _channel_run(mid_in, mid_out, lay.axis - lead, lay.inner, lead)
    if run is not None:
        s0, s1, j0, j1 = run
        seg_in, seg_out = mid_in[s0:s1], mid_out[j0:j1]
        if _reshape_middle(node, ctx, lay, nz, seg_in, seg_out, lead + s0, lead + j0):
            return
    if _reshape_factors(node, ctx, lay, nz, mid_in, mid_out, lead):
        return
    ctx.decline(
        node,
        f"Reshape '{node.name}': channel axis mixed with other dims (input dims "
        f"{mid_in} -> {mid_out} around axis {lay.axis}); needs the channel axis (with its "
        "head axis) to merge into or split from one output axis",
    )


def _reshape_middle(
    node: onnx.NodeProto,
    ctx: AnalysisContext,
    lay: Layout,
    nz: np.ndarray,
    mid_in: list[int],
    mid_out: list[int],
    lead_in: int,
    lead_out: int,
) -> bool:
    """The merge or split of the channel axis inside ``mid_in -> mid_out`` (the input dims
    from ``lead_in``, the output dims from ``lead_out``); False when it mixes the channel
    axis with other dims (nothing recorded), True when handled or declined."""
    big_in = [i for i, d in enumerate(mid_in) if d != 1]
    big_out = [i for i, d in enumerate(mid_out) if d != 1]
    pos = lay.axis - lead_in
    if len(big_out) == 1:
        inner = None if lay.inner is None else lay.inner - lead_in
        dims = [mid_in[i] for i in big_in]
        if pos not in big_in or (inner is not None and inner not in big_in):
            ctx.decline(node, f"Reshape '{node.name}': channel axis of size 1")
            return True
        merged = merge_axes(
            lay, dims, big_in.index(pos), None if inner is None else big_in.index(inner)
        )
        if merged is None:
            ctx.decline(node, f"Reshape '{node.name}' merges a head without its channels")
            return True
        axis = lead_out + big_out[0]
        if _reshape_edit(node, ctx, axis):
            ctx.set(node.output[0], merged.moved(axis), _merged_nz(nz, dims, big_in.index(pos)))
        return True
    if big_in == [pos] and lay.fold == 1:
        res = split_axis(lay, [mid_out[i] for i in big_out])
        if res is None:
            ctx.decline(node, f"Reshape '{node.name}': unsupported split of the channel axis "
                        f"into {[mid_out[i] for i in big_out]}; needs [heads, head_dim], "
                        "[g, k] or packed [g, heads, head_dim] with each block whole heads")
            return True
        kind, new, at = res
        outer, inner = (lead_out + big_out[0], lead_out + big_out[-1])
        if kind == "heads" and (
            _unpacked_later(ctx, node.output[0], outer)
            or _swapped_next(ctx, node.output[0], outer, inner)
            or _reads_own_width(node, ctx, inner)
            or _reduced_later(ctx, node.output[0], outer)
        ):
            kind, new, at = (
                "rows",
                Layout(0, lay.space[: len(lay) // len(new)], lay.chan[: len(lay) // len(new)]),
                new.inner,
            )
        k = len(lay) // len(new)
        if kind in ("heads", "packed") and not _head_size_known(node, ctx, inner):
            ctx.decline(node, f"Reshape '{node.name}': head size computed at run time (needs a "
                        "constant, or a dim read from a tensor other than the one split)")
            return True
        if kind in ("heads", "packed"):
            # packed [3*E] -> [3, H, D]: the g blocks joined, so Q, K and V of a head are one
            # unit; plain heads are the one-block case
            g = mid_out[big_out[0]] if kind == "packed" else 1
            rows = block_rows(lay, g)
            for row in rows[1:]:
                ctx.join(rows[0], row)
            ctx.bundle(new)
            new_nz = nz.reshape(g, len(new), -1).any(axis=(0, 2))
            new = new.moved(lead_out + big_out[at], lead_out + big_out[new.inner])
        elif kind == "rows":
            rows = block_rows(lay, len(lay) // len(new))
            for row in rows[1:]:
                ctx.join(rows[0], row)
            new_nz = nz.reshape(len(rows), -1).any(axis=0)
            new = new.moved(lead_out + big_out[at])
        else:
            new_nz = nz.reshape(-1, k).any(axis=1) if kind == "unflatten" else nz
            new = new.moved(lead_out + big_out[at])
        if _reshape_edit(node, ctx, new.axis):
            ctx.set(node.output[0], new, new_nz)
        return True
    return False


def _reshape_factors(
    node: onnx.NodeProto,
    ctx: AnalysisContext,
    lay: Layout,
    nz: np.ndarray,
    mid_in: list[int],
    mid_out: list[int],
    lead: int,
) -> bool:
    """Patch unfold and fold (MobileViT: ``[B, C, H, W] -> [B*C*nh, ph, nw, pw]`` and back),
    where the channel axis survives as a factor: both sides are cut at every prefix product
    into common factors; the channel axis splits into its factors (``same`` or ``unflatten``:
    a merged axis whose channel repeats over the rest) and the channel factor merges with
    the other factors of the output axis holding it (``merge_axes``: each channel repeats).
    False (nothing recorded) where the cuts do not nest or the channels are not one factor."""
    if lay.fold != 1:
        return False
    cuts_in = [int(np.prod(mid_in[:i], dtype=np.int64)) for i in range(len(mid_in) + 1)]
    cuts_out = [int(np.prod(mid_out[:j], dtype=np.int64)) for j in range(len(mid_out) + 1)]
    cuts = sorted(set(cuts_in) | set(cuts_out))
    if 0 in cuts or any(b % a for a, b in zip(cuts, cuts[1:], strict=False)):
        return False
    factors = [b // a for a, b in zip(cuts, cuts[1:], strict=False)]
    pos = lay.axis - lead
    a, b = cuts.index(cuts_in[pos]), cuts.index(cuts_in[pos + 1])
    if b - a != 1:
        res = split_axis(lay, factors[a:b])
        if res is None or res[0] not in ("same", "unflatten"):
            return False
        kind, lay, at = res
        nz = nz.reshape(len(lay), -1).any(axis=1) if kind == "unflatten" else nz
        a += at
    j = next(j for j in range(len(mid_out)) if cuts_out[j] <= cuts[a] < cuts_out[j + 1])
    c0, c1 = cuts.index(cuts_out[j]), cuts.index(cuts_out[j + 1])
    merged = merge_axes(lay, factors[c0:c1], a - c0, None)
    if _reshape_edit(node, ctx, lead + j):
        ctx.set(node.output[0], merged.moved(lead + j), _merged_nz(nz, factors[c0:c1], a - c0))
    return True


def _merged_nz(nz: np.ndarray, dims: list[int], pos: int) -> np.ndarray:
    """The non-zero flags of the channels of axis ``pos`` after merging ``dims`` (C order)."""
    flat = Layout(0, nz.astype(np.int64), np.zeros(len(nz), np.int64))
    return merge_axes(flat, dims, pos, None).space.astype(bool)


def _channel_run(
    mid_in: list[int], mid_out: list[int], pos: int, inner: int | None, lead: int
) -> tuple[int, int, int, int] | None:
    """The smallest run ``mid_in[s0:s1]`` around the channel axis ``pos`` (and its head axis,
    ``inner`` counted from the input's axis 0) that reshapes into a run ``mid_out[j0:j1]``
    on its own: the products of the dims before both runs, and through both runs, agree
    (``[B, S, H, d] -> [B*S, H*d]``: run ``[H, d] -> [H*d]``). None when there is none."""
    prefix_out: dict[int, list[int]] = {}
    for j in range(len(mid_out) + 1):
        prefix_out.setdefault(int(np.prod(mid_out[:j], dtype=np.int64)), []).append(j)
    prefix_in = [int(np.prod(mid_in[:i], dtype=np.int64)) for i in range(len(mid_in) + 1)]
    last = pos if inner is None else max(pos, inner - lead)
    first = pos if inner is None else min(pos, inner - lead)
    if first < 0:
        return None
    starts = [i for i in range(first, -1, -1) if prefix_in[i] in prefix_out]
    ends = [i for i in range(last + 1, len(mid_in) + 1) if prefix_in[i] in prefix_out]
    if not starts or not ends:
        return None
    s0, s1 = starts[0], ends[0]
    j0, j1 = max(prefix_out[prefix_in[s0]]), min(prefix_out[prefix_in[s1]])
    if j1 <= j0 or (s0, s1) == (0, len(mid_in)):
        return None
    return s0, s1, j0, j1


def _copied_dim(node: onnx.NodeProto, ctx: AnalysisContext, axis: int) -> int | None:
    """A Reshape target entry 0 ("copy the input dim", ``allowzero`` unset) that would not
    follow the pruning when the channels land on output ``axis``: at ``axis`` copying
    another input dim, or at the input's channel axis copying the channel count elsewhere."""
    lay = ctx.layout(node.input[0])
    if int(attr(node, "allowzero", 0)) or lay is None or lay.axis == axis:
        return None
    rank = ctx.rank(node.output[0]) or 0
    for k in (axis, lay.axis):
        if k < rank and _target_entry(node, ctx, k) == 0:
            return k
    return None


def _swapped_next(ctx: AnalysisContext, name: str, a: int, b: int) -> bool:
    """True when the only consumer of ``name`` is a Transpose swapping axes a and b (the
    middle step of a channel shuffle ``[N, g, C/g, H, W] -> [N, C/g, g, H, W]``)."""
    users = ctx.index.consumers.get(name, [])
    if len(users) != 1 or users[0].op_type != "Transpose":
        return False
    perm = list(attr(users[0], "perm", None) or [])
    return len(perm) > max(a, b) and perm[a] == b and perm[b] == a


def _target_entry(node: onnx.NodeProto, ctx: AnalysisContext, axis: int) -> int | None:
    """Entry ``axis`` of a Reshape's target when it is a constant (directly or as a constant
    piece of Concats, ``_target_piece``), else None."""
    piece = _target_piece(ctx, node.input[1], axis)
    value = None if piece is None else ctx.const(piece[0])
    return None if value is None else int(np.atleast_1d(value)[piece[1]])


def _unpacked_later(ctx: AnalysisContext, name: str, axis: int) -> bool:
    """True when axis ``axis`` of ``name`` is later indexed by Gather or Split (a packed
    QKV projection ``[S, B, 3, D]`` being unpacked), seen through Transpose/Squeeze/Unsqueeze."""
    for _ in range(8):
        users = ctx.index.consumers.get(name, [])
        if not users:
            return False
        user = users[0]
        rank = ctx.rank(name) or 0
        if user.op_type in ("Gather", "Split"):
            return all(
                u.op_type == user.op_type and int(attr(u, "axis", 0)) % rank == axis for u in users
            )
        if len(users) != 1:
            return False
        if user.op_type == "Transpose":
            perm = attr(user, "perm", None) or list(reversed(range(rank)))
            axis = list(perm).index(axis)
        elif user.op_type in ("Unsqueeze", "Squeeze"):
            axes = _axes(user, ctx, 1) or []
            out_rank = rank + len(axes) if user.op_type == "Unsqueeze" else rank - len(axes)
            axes = sorted(a % (out_rank if user.op_type == "Unsqueeze" else rank) for a in axes)
            if user.op_type == "Unsqueeze":
                old = [i for i in range(out_rank) if i not in axes]
                axis = old[axis]
            else:
                if axis in axes:
                    return False
                axis -= sum(1 for a in axes if a < axis)
        else:
            return False
        name = user.output[0]
    return False


def _solve_unknown_dim(src: tuple, dst: tuple) -> tuple:
    """Fill one unknown output dim from the element count (inference gives up on ``C // g``)."""
    unknown = [i for i, d in enumerate(dst) if not isinstance(d, int)]
    if len(unknown) != 1 or not all(isinstance(d, int) for d in src):
        return dst
    known = int(np.prod([d for d in dst if isinstance(d, int)]))
    total = int(np.prod(src))
    if known == 0 or total % known:
        return dst
    return tuple(total // known if i == unknown[0] else d for i, d in enumerate(dst))


def _reshape_edit(node: onnx.NodeProto, ctx: AnalysisContext, axis: int) -> bool:
    """Record that shape[axis] must become the kept length; False (declined) when that
    entry is computed at run time from something other than the channel dim itself."""
    zero = _copied_dim(node, ctx, axis)
    if zero is not None:
        ctx.decline(
            node,
            f"Reshape '{node.name}': target entry {zero} is 0 (copy the input dim) where the "
            "channel count moves; needs an explicit size or -1 there",
        )
        return False
    shape = ctx.const(node.input[1])
    if shape is not None:
        if int(shape[axis]) > 0:
            ctx.edit(RESHAPE_DIM, node, node.output[0], input=1, axis=axis)
        return True
    slot = _target_slot(ctx, node.input[1], axis)
    if slot is None:
        ctx.decline(node, f"Reshape '{node.name}': target shape computed at run time")
        return False
    piece, i, entry = slot
    value = ctx.const(piece.input[i])
    if value is not None:
        if int(np.atleast_1d(value)[entry]) > 0:
            ctx.edit(RESHAPE_DIM, piece, node.output[0], input=i, axis=entry, extra=(node.name,))
        return True
    source = _shape_source(ctx, piece.input[i], entry)
    product = source is None  # B * C * nh: times dims pruning does not change
    if product:
        source = _shape_source(ctx, piece.input[i], entry, times_dims=True)
    if _reads_channel_count(ctx, source):  # follows the pruning
        if source[0] != node.input[0] and ctx.shape(piece.input[i]) == (1,) and not product:
            # another tensor's width: spell the kept count instead (right whether or not
            # that width follows the pruning); ``check_deferred`` then needs no tie
            ctx.edit(RESHAPE_DIM, piece, node.output[0], input=i, axis=0,
                     extra=(node.name, PINNED))
            _note_width_read(ctx, node, axis, "channel", source)
        return True
    out = ctx.shape(node.output[0])
    factor = None if out is None else _constant_factor(ctx, piece.input[i], out[axis])
    if factor is not None:  # torch MHA's bsz * num_heads, bsz 1 here: rewrite num_heads
        mul, k, reshapes = factor
        ctx.edit(RESHAPE_DIM, mul, node.output[0], input=k, extra=(node.name, SCALED))
        for other in reshapes:  # q, k and v share bsz * num_heads: the same heads, or fixed
            if other is not node:
                ctx.same_channels_later(node.output[0], other.output[0], f"Reshape '{node.name}'")
        return True
    ctx.decline(node, f"Reshape '{node.name}': channel dim computed at run time")
    return False


def _constant_factor(
    ctx: AnalysisContext, name: str, count: object
) -> tuple[onnx.NodeProto, int, list[onnx.NodeProto]] | None:
    """``(mul, k, reshapes)`` when ``name`` is, through Unsqueeze/Cast, ``Mul(d, c)`` with input
    ``k``, ``c``, a constant equal to the channel entry ``count`` and ``d`` dims pruning does
    not change (``_dim_read``, 1 here): rewriting ``c`` to the kept count keeps ``d * c``
    right. ``reshapes`` are all the Reshapes whose targets read the Mul (they must keep the
    same count); None where it feeds anything else."""
    node = _past_casts(ctx, name)
    if node is None or node.op_type != "Mul":
        return None
    reshapes = _target_readers(ctx, node.output[0])
    for k in (0, 1):
        value, other = ctx.const(node.input[k]), node.input[1 - k]
        is_count = value is not None and value.size == 1 and int(value.ravel()[0]) == count
        if is_count and reshapes and ctx.const(other) is None and _dim_read(ctx, other):
            return node, k, reshapes
    return None


def _target_readers(ctx: AnalysisContext, name: str, depth: int = 0) -> list[onnx.NodeProto]:
    """The Reshapes whose target shape ``name`` feeds through Unsqueeze/Cast/Squeeze/Concat;
    empty where it feeds anything else."""
    found = []
    for user in ctx.index.consumers.get(name, []):
        if user.op_type == "Reshape" and user.input[1] == name:
            found.append(user)
        elif user.op_type in ("Unsqueeze", "Cast", "Squeeze", "Concat") and depth < 4:
            more = _target_readers(ctx, user.output[0], depth + 1)
            if not more:
                return []
            found += more
        else:
            return []
    return found


def _reduced_later(ctx: AnalysisContext, name: str, axis: int, depth: int = 0) -> bool:
    """True when axis ``axis`` of ``name`` is summed, averaged or normalized over by a Reduce or
    Softmax, directly or after Transpose or elementwise Mul/Add (ResNeSt's split attention:
    a softmax over the radix axis, ``(x * attn).sum(1)``): rows joined element-wise, not heads."""
    rank = ctx.rank(name) or 0
    for user in ctx.index.consumers.get(name, []) if depth < 3 else []:
        if user.op_type in ("ReduceSum", "ReduceMean"):
            if axis in [a % rank for a in _axes(user, ctx, 1) or []]:
                return True
        elif user.op_type == "Softmax":
            if int(attr(user, "axis", -1)) % rank == axis:
                return True
        elif user.op_type == "Transpose":
            perm = list(attr(user, "perm", None) or reversed(range(rank)))
            if _reduced_later(ctx, user.output[0], perm.index(axis), depth + 1):
                return True
        elif (
            user.op_type in ("Mul", "Add")
            and ctx.rank(user.output[0]) == rank
            and _reduced_later(ctx, user.output[0], axis, depth + 1)
        ):
            return True
    return False


def _entry_source(node: onnx.NodeProto, ctx: AnalysisContext, axis: int) -> tuple[str, int] | None:
    """``_shape_source`` of target entry ``axis`` of Reshape ``node`` (through its Concats)."""
    piece = _target_piece(ctx, node.input[1], axis)
    return None if piece is None else _shape_source(ctx, *piece)


def _reads_own_width(node: onnx.NodeProto, ctx: AnalysisContext, axis: int) -> bool:
    """True when target entry ``axis`` is the split tensor's own channel count over a
    constant, ``Shape(x)[c] / g`` (ResNeSt's ``[B, radix, C // radix, H, W]``): as the size of
    heads it would not follow the pruning, as the row length of ``g`` joined rows it does."""
    source = _entry_source(node, ctx, axis)
    return source is not None and source[0] == node.input[0] and _reads_channel_count(ctx, source)


def _head_size_known(node: onnx.NodeProto, ctx: AnalysisContext, axis: int) -> bool:
    """Whether target entry ``axis`` (a head size) is a constant, or ``Shape(t)[a]`` over
    constants with ``t`` not the tensor split: a dim pruning does not change, or another
    tensor's channel count, which ``check_deferred`` then keeps (Swin's and PVT's
    ``C // num_heads`` read from the residual width)."""
    if _target_entry(node, ctx, axis) is not None:
        return True
    source = _entry_source(node, ctx, axis)
    if source is None or source[0] == node.input[0]:
        return False
    if _reads_channel_count(ctx, source):
        _note_width_read(ctx, node, axis, "head", source)
    return True


def _note_width_read(
    ctx: AnalysisContext, node: onnx.NodeProto, axis: int, kind: str, source: tuple[str, int]
) -> None:
    """Record that target entry ``axis`` of Reshape ``node`` reads ``source``'s channel count
    and how the rule resolved it, with every entry that reads that width (``check_deferred``
    trusts the record only where all of them are resolved)."""

    def may_read(j: int) -> bool:  # entry j is not a constant, and reads source or is untraced
        piece = _target_piece(ctx, node.input[1], j)
        if piece is None:
            return True
        if piece[1] == 0 and _dim_read(ctx, piece[0]):  # a product of other dims: B * N
            return False
        return ctx.const(piece[0]) is None and _shape_source(ctx, *piece) in (None, source)

    kinds, entries = ctx.width_reads.get((source[0], node.name), ({}, None))
    if entries is None:
        entries = frozenset(filter(may_read, range(ctx.rank(node.output[0]) or 0)))
    ctx.width_reads[(source[0], node.name)] = ({**kinds, axis: kind}, entries)


def _reads_channel_count(ctx: AnalysisContext, source: tuple[str, int] | None) -> bool:
    """True when ``source`` (``Shape(x)[a]``, from ``_shape_source``) has ``a`` the channel
    axis of ``x``: the value is ``x``'s channel count."""
    lay = None if source is None else ctx.layout(source[0])
    return lay is not None and lay.axis == source[1]


def _shape_source(
    ctx: AnalysisContext, name: str, entry: int = 0, times_dims: bool = False
) -> tuple[str, int] | None:
    """``(x, a)`` when entry ``entry`` of ``name`` is ``Shape(x)[a]``: by Gather, or a Slice of
    the shape (dynamo's ``Shape(q)[:-2]`` carries the batch and the heads), optionally
    Unsqueezed, Squeezed, Cast, divided or multiplied by a constant; with ``times_dims`` also
    multiplied by dims that are not a channel count (``_dim_read``: MobileViT's ``B * C *
    nh``), giving the factor that is. Else None."""
    node = ctx.index.producer.get(name)
    while node is not None and node.op_type in ("Unsqueeze", "Cast", "Div", "Mul", "Squeeze"):
        if node.op_type in ("Div", "Mul") and ctx.const(node.input[1]) is None:
            if not times_dims or node.op_type != "Mul":
                return None
            reads = [_shape_source(ctx, i, 0, True) for i in node.input[:2]]
            channel = [r for r in reads if _reads_channel_count(ctx, r)]
            others = [i for i, r in zip(node.input[:2], reads, strict=True) if r not in channel]
            if len(channel) != 1 or not all(_dim_read(ctx, i) for i in others):
                return None
            return channel[0]
        node = ctx.index.producer.get(node.input[0])
    if node is None or node.op_type not in ("Gather", "Slice"):
        return None
    shape_node = ctx.index.producer.get(node.input[0])
    if shape_node is None or shape_node.op_type != "Shape":
        return None
    x = shape_node.input[0]
    rank = ctx.rank(x) or 1
    end = attr(shape_node, "end", None)
    dims = list(range(rank))[int(attr(shape_node, "start", 0)):None if end is None else int(end)]
    if node.op_type == "Gather":
        index = ctx.const(node.input[1])
        if entry != 0 or index is None or index.size != 1:
            return None
        i = int(index.ravel()[0])
        return (x, dims[i]) if -len(dims) <= i < len(dims) else None
    taken = _sliced_range(ctx, node, len(dims))
    picked = [] if taken is None else [dims[k] for k in taken]
    return (x, picked[entry]) if 0 <= entry < len(picked) else None


def _dim_read(ctx: AnalysisContext, name: str) -> bool:
    """True when ``name`` is a constant or a product of shape dims none of which is a channel
    count (a batch or a spatial size): pruning does not change it."""
    if ctx.const(name) is not None:
        return True
    node = _past_casts(ctx, name)
    if node is not None and node.op_type == "Mul" and ctx.const(node.input[1]) is None:
        return all(_dim_read(ctx, i) for i in node.input[:2])
    source = _shape_source(ctx, name)
    return source is not None and not _reads_channel_count(ctx, source)


def _past_casts(ctx: AnalysisContext, name: str) -> onnx.NodeProto | None:
    """The producer of ``name`` seen through Unsqueeze, Cast and Squeeze (a scalar's wrappers)."""
    node = ctx.index.producer.get(name)
    while node is not None and node.op_type in ("Unsqueeze", "Cast", "Squeeze"):
        node = ctx.index.producer.get(node.input[0])
    return node


def _target_piece(ctx: AnalysisContext, name: str, entry: int) -> tuple[str, int] | None:
    """The tensor and entry that spell entry ``entry`` of the shape vector ``name``, through
    (nested) Concats of 1-D pieces of known length; None where a length is unknown."""
    producer = ctx.index.producer.get(name)
    if producer is None or producer.op_type != "Concat":
        return name, entry
    slot = _target_slot(ctx, name, entry)
    return None if slot is None else (slot[0].input[slot[1]], slot[2])


def _target_slot(
    ctx: AnalysisContext, name: str, entry: int
) -> tuple[onnx.NodeProto, int, int] | None:
    """``(concat, i, e)``: entry ``entry`` of the shape vector ``name`` is entry ``e`` of input
    ``i`` of ``concat``, the innermost of (nested) Concats of 1-D pieces of known length
    (the lengths before it must be known); None where ``name`` is no Concat or a length is
    unknown."""
    slot = None
    for _ in range(8):
        piece = ctx.index.producer.get(name)
        if piece is None or piece.op_type != "Concat":
            return slot
        offset = 0
        for i, part in enumerate(piece.input):
            size = (ctx.shape(part) or (None,))[0]
            if not isinstance(size, int):
                return None
            if offset <= entry < offset + size:
                slot, name, entry = (piece, i, entry - offset), part, entry - offset
                break
            offset += size
        else:
            return None
    return None


@register("Flatten")
def flatten(node: onnx.NodeProto, ctx: AnalysisContext) -> None:
    """Flatten(axis k): [d0..dk-1 | dk..] -> 2-D; a channel axis a >= k repeats over the
    trailing dims of its part (c -> c * prod(d[a+1:]) + r)."""
    lay = ctx.layout(node.input[0])
    src = ctx.shape(node.input[0])
    if lay is None:
        return
    k = int(attr(node, "axis", 1))
    if src is None:
        ctx.decline(node, f"Flatten '{node.name}': shape unknown")
        return
    k %= len(src) if k < 0 else len(src) + 1
    part = list(src[k:])
    if lay.axis < k or not all(isinstance(d, int) for d in part):
        ctx.decline(node, f"Flatten '{node.name}': channel axis before the flatten axis")
        return
    inner = None if lay.inner is None else lay.inner - k
    merged = merge_axes(lay, part, lay.axis - k, inner)
    nz = ctx.nonzero(node.input[0])
    merged_nz = merge_axes(
        Layout(0, nz.astype(np.int64), np.zeros(len(nz), np.int64)), part, lay.axis - k, None
    )
    if merged is None:
        ctx.decline(node, f"Flatten '{node.name}' merges a head without its channels")
        return
    ctx.set(node.output[0], merged.moved(1), merged_nz.space.astype(bool))


@register("Concat")
def concat_rule(node: onnx.NodeProto, ctx: AnalysisContext) -> None:
    """Concat on the channel axis offsets each input's channels; on another axis it couples
    the inputs channel by channel like Add."""
    rank = ctx.rank(node.output[0])
    axis = int(attr(node, "axis", 0)) % (rank or 1)
    tracked = [ctx.layout(i) for i in node.input if ctx.layout(i) is not None]
    if not tracked:
        return
    if all(t.axis != axis for t in tracked):
        res = couple_inputs(node, ctx, list(range(len(node.input))))
        if res is not None:
            base, ins = res
            nz = np.zeros(len(base), dtype=bool)
            for i in ins:
                nz |= ctx.nonzero(node.input[i])
            ctx.set(node.output[0], base, nz)
        return
    pieces, nzs = [], []
    for name in node.input:
        lay = ctx.layout(name)
        shape = ctx.shape(name)
        if lay is not None and lay.axis == axis:
            pieces.append(lay)
            nzs.append(ctx.nonzero(name))
        elif lay is None and shape is not None and isinstance(shape[axis], int):
            pieces.append(Layout.fixed(shape[axis], axis))
            nzs.append(np.zeros(shape[axis], dtype=bool))
        else:
            ctx.decline(node, f"Concat '{node.name}': inputs with different channel axes")
            return
    out = concat(pieces, axis)
    if out is None:
        ctx.decline(node, f"Concat '{node.name}': heads concatenated with channels")
        return
    ctx.set(node.output[0], out, np.concatenate(nzs))


@register("Split")
def split(node: onnx.NodeProto, ctx: AnalysisContext) -> None:
    """Split on the channel axis gives each output its run of elements (sizes rewritten);
    an implicit equal split ties the outputs element by element so they stay equal."""
    lay = ctx.layout(node.input[0])
    rank = ctx.rank(node.input[0])
    if lay is None or rank is None:
        return
    axis = int(attr(node, "axis", 0)) % rank
    nz = ctx.nonzero(node.input[0])
    if axis != lay.axis:
        if lay.inner == axis:
            ctx.decline(node, f"Split '{node.name}' splits heads")
            return
        for out in node.output:
            ctx.set(out, lay, nz)
        return
    sizes = attr(node, "split", None)
    if sizes is None and len(node.input) > 1 and node.input[1]:
        value = ctx.const(node.input[1])
        if value is None:
            ctx.decline(node, f"Split '{node.name}': sizes are not constant")
            return
        sizes = [int(v) for v in value]
    explicit = sizes is not None
    if sizes is None:
        n = len(node.output)
        sizes = [len(lay) // n] * n
        if len(lay) % n:
            ctx.decline(node, f"Split '{node.name}': uneven implicit split")
            return
    offsets = np.cumsum([0, *sizes])
    parts = [np.arange(offsets[i], offsets[i + 1]) for i in range(len(sizes))]
    for out, idx in zip(node.output, parts, strict=True):
        ctx.set(out, lay.take(idx), nz[idx])
    if explicit:
        ctx.edit(SPLIT_SIZES, node, node.input[0], extra=tuple(node.output))
    else:
        for idx in parts[1:]:
            ctx.join(lay.take(parts[0]), lay.take(idx))


@register("Slice", since=10)
def slice_rule(node: onnx.NodeProto, ctx: AnalysisContext) -> None:
    """Slice: on another axis the channels pass through; on the channel axis (step 1,
    constant bounds) the output holds that run of elements and the bounds are rewritten."""
    lay = ctx.layout(node.input[0])
    shape = ctx.shape(node.input[0])
    if lay is None or shape is None:
        return
    rank = len(shape)
    starts, ends = ctx.const(node.input[1]), ctx.const(node.input[2])
    axes = _axes(node, ctx, 3)
    steps = ctx.const(node.input[4]) if len(node.input) > 4 and node.input[4] else None
    if axes is None:
        axes = list(range(len(starts))) if starts is not None else None
    if axes is None:
        ctx.decline(node, f"Slice '{node.name}': axes are not constant")
        return
    axes = [a % rank for a in axes]
    if lay.inner is not None and lay.inner in axes:
        ctx.decline(node, f"Slice '{node.name}' slices within heads")
        return
    if lay.axis not in axes:
        passthrough(node, ctx)
        return
    k = axes.index(lay.axis)
    if (starts is None or ends is None) and len(axes) == 1 and steps is None:
        _runtime_chunk(node, ctx, lay)
        return
    if starts is None or ends is None or (steps is not None and int(steps[k]) != 1):
        ctx.decline(node, f"Slice '{node.name}': non-constant or strided slice of channels")
        return
    idx = np.arange(len(lay))[int(starts[k]) : int(ends[k])]
    ctx.set(node.output[0], lay.take(idx), ctx.nonzero(node.input[0])[idx])
    ctx.edit(SLICE_BOUNDS, node, node.input[0], axis=k, extra=(node.output[0],))


def _runtime_chunk(node: onnx.NodeProto, ctx: AnalysisContext, lay: Layout) -> None:
    """Slice bounds computed from the channel count (``torch.chunk``): the slice must be
    chunk j of k equal chunks for every channel count the pruning can leave; the k chunks
    are then tied element by element so they stay equal."""
    n, x = len(lay), node.input[0]
    bounds = [runtime_value(ctx, node.input[i], x, n) for i in (1, 2)]
    if None in bounds:
        ctx.decline(node, f"Slice '{node.name}': channel bounds computed at run time")
        return
    start, end = (max(0, min(b, n)) for b in bounds)
    size = end - start
    if size <= 0 or n % size or start % size:
        ctx.decline(node, f"Slice '{node.name}': run-time bounds are not an equal chunk")
        return
    k, j = n // size, start // size
    for m in range(1, size + 1):  # every count the tied chunks can be pruned to
        got = [runtime_value(ctx, node.input[i], x, k * m) for i in (1, 2)]
        if got != [j * m, min((j + 1) * m, 2**62) if bounds[1] < n else got[1]]:
            ctx.decline(node, f"Slice '{node.name}': run-time bounds do not follow pruning")
            return
    chunks = [lay.take(np.arange(c * size, (c + 1) * size)) for c in range(k)]
    for other in chunks[1:]:
        ctx.join(chunks[0], other)
    idx = np.arange(start, end)
    ctx.set(node.output[0], lay.take(idx), ctx.nonzero(x)[idx])


@register("Gather")
def gather(node: onnx.NodeProto, ctx: AnalysisContext) -> None:
    """Gather: from a constant table it is an embedding (produces channels); on a tracked
    tensor along another axis the channels pass through, shifted by the indices' rank."""
    if ctx.index.initializer_name(node.input[0]) is not None and ctx.layout(node.input[1]) is None:
        if int(attr(node, "axis", 0)) == 0:
            embedding(node, ctx)
        return
    lay = ctx.layout(node.input[0])
    rank = ctx.rank(node.input[0])
    idx_rank = ctx.rank(node.input[1])
    if lay is None or rank is None or idx_rank is None:
        return
    axis = int(attr(node, "axis", 0)) % rank
    mapping = {a: (a if a < axis else a + idx_rank - 1) for a in range(rank) if a != axis}
    _moved(ctx, node, lay, mapping)


@register("Expand")
def expand(node: onnx.NodeProto, ctx: AnalysisContext) -> None:
    """Expand: broadcasts to a shape of higher or equal rank; the channel axis shifts right.
    A constant target shape that spells the channel count is rewritten; a target built at
    run time passes when its channel entry is a 1 the graph spells (``shape_values``)."""
    lay = ctx.layout(node.input[0])
    rank, out_rank = ctx.rank(node.input[0]), ctx.rank(node.output[0])
    if lay is None or rank is None or out_rank is None:
        return
    shift = out_rank - rank
    target = ctx.const(node.input[1])
    if target is None:
        entries = partial_value(ctx, node.input[1])
        k = None if entries is None else lay.axis + shift - (out_rank - len(entries))
        if entries is None or (k is not None and 0 <= k < len(entries) and entries[k] != 1):
            ctx.decline(node, f"Expand '{node.name}': target shape computed at run time, its "
                        "channel entry not a constant 1")
            return
    else:
        k = lay.axis + shift - (out_rank - len(target))
        if 0 <= k < len(target) and int(target[k]) > 1:
            ctx.edit(RESHAPE_DIM, node, node.output[0], input=1, axis=k)
    _moved(ctx, node, lay, {a: a + shift for a in range(rank)})


@register("Tile")
def tile(node: onnx.NodeProto, ctx: AnalysisContext) -> None:
    """Tile: pass-through when the channel axis is repeated once."""
    lay = ctx.layout(node.input[0])
    reps = ctx.const(node.input[1])
    if lay is None:
        return
    if reps is None or int(reps[lay.axis]) != 1:
        ctx.decline(node, f"Tile '{node.name}' repeats the channel axis")
        return
    passthrough(node, ctx)


@register("Pad", since=2)
def pad(node: onnx.NodeProto, ctx: AnalysisContext) -> None:
    """Pad: pass-through when the channel axis is not padded; a non-zero constant value makes
    removed channels non-zero."""
    lay = ctx.layout(node.input[0])
    rank = ctx.rank(node.input[0])
    if lay is None or rank is None:
        return
    pads = attr(node, "pads", None)
    if pads is None and len(node.input) > 1:
        pads = ctx.const(node.input[1])
    axes = _axes(node, ctx, 3) if ctx.opset >= 18 else None
    axes = list(range(rank)) if axes is None else [a % rank for a in axes]
    if pads is None:
        ctx.decline(node, f"Pad '{node.name}': pads are not constant")
        return
    pads = [int(p) for p in pads]
    n = len(axes)
    if lay.axis in axes:
        k = axes.index(lay.axis)
        if pads[k] or pads[k + n]:
            ctx.decline(node, f"Pad '{node.name}' pads the channel axis")
            return
    value = attr(node, "value", 0.0)
    if len(node.input) > 2 and node.input[2]:
        c = ctx.const(node.input[2])
        value = 0.0 if c is None or c.size == 0 else float(np.asarray(c).ravel()[0])
    mode = attr(node, "mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    passthrough(node, ctx, keeps_zero=(mode != "constant" or value == 0.0))


@register("Resize", "Upsample")
def resize(node: onnx.NodeProto, ctx: AnalysisContext) -> None:
    """Resize/Upsample: pass-through when the channel axis scale is 1; explicit ``sizes``
    get the kept channel count."""
    lay = ctx.layout(node.input[0])
    if lay is None:
        return
    for i in range(1, len(node.input)):
        value = ctx.const(node.input[i]) if node.input[i] else None
        if value is None or value.size == 0 or value.ndim != 1:
            continue
        scales = value.dtype.kind == "f" and value.size == ctx.rank(node.input[0])
        if scales and float(value[lay.axis]) != 1.0:
            ctx.decline(node, f"{node.op_type} '{node.name}' scales the channel axis")
            return
        if value.dtype.kind == "i" and value.size == ctx.rank(node.input[0]) and i == 3:
            ctx.edit(RESHAPE_DIM, node, node.output[0], input=i, axis=lay.axis)
    passthrough(node, ctx)


@register("Shape", "Size")
def shape_of(node: onnx.NodeProto, ctx: AnalysisContext) -> None:
    """Shape/Size read sizes only. Reading the channel dim is safe where the value feeds a
    Reshape of the same tensor (``view(b, g, C // g, h, w)``: it follows the pruning); any
    other use of the channel count (a shape spelled for another tensor) fixes the channels."""
    lay = ctx.layout(node.input[0])
    rank = ctx.rank(node.input[0])
    if lay is None or rank is None:
        return
    if node.op_type == "Size":
        ctx.fix(lay, f"Size '{node.name}' reads the channel count")
        return
    start = _clamp_dim_index(int(attr(node, "start", 0)), rank)
    end = attr(node, "end", None)
    end = rank if end is None else _clamp_dim_index(int(end), rank)
    if not start <= lay.axis < end:
        return
    channel_pos = lay.axis - start
    for user in ctx.index.consumers.get(node.output[0], []):
        if not _shape_use_is_safe(ctx, user, channel_pos, end - start, node.input[0]):
            ctx.fix(
                lay, f"{user.op_type} '{user.name}' uses the channel count of '{node.input[0]}'"
            )
            return


def _clamp_dim_index(i: int, rank: int) -> int:
    """Shape's start/end: negative counts from the back, then clamped to [0, rank]."""
    return max(0, min(rank, i + rank if i < 0 else i))


def _shape_use_is_safe(ctx: AnalysisContext, user, pos: int, length: int, source: str) -> bool:
    """True when ``user`` of a shape vector ignores entry ``pos`` or passes it only into the
    Reshape target of ``source`` itself."""
    if user.op_type == "Gather":
        index = ctx.const(user.input[1])
        if index is None:
            return False
        picked = {int(i) % length for i in np.atleast_1d(index)}
        if pos not in picked:
            return True
        return _feeds_own_reshape(ctx, user.output[0], source)
    if user.op_type == "Slice":
        picked = _sliced_range(ctx, user, length)
        if picked is None:
            return False
        if pos not in picked:
            return True
        return _feeds_own_reshape(ctx, user.output[0], source)
    return False


def _sliced_range(ctx: AnalysisContext, node: onnx.NodeProto, length: int) -> range | None:
    """The entries a Slice (axis 0, step 1) takes from a vector of ``length``. A run-time bound
    (legacy MHA's unflatten: ``shape[:dim]``, ``shape[dim + 1:]``) is read off the other
    bound and the output's known length; None where neither works."""
    if len(node.input) > 4 and node.input[4]:
        return None
    starts, ends = ctx.const(node.input[1]), ctx.const(node.input[2])
    if starts is not None and ends is not None:
        return range(length)[int(starts[0]) : int(ends[0])]
    out_len = (ctx.shape(node.output[0]) or (None,))[0]
    if not isinstance(out_len, int) or (starts is None and ends is None):
        return None
    if starts is not None:
        start = range(length)[int(starts[0]) :].start
        return range(start, start + out_len)
    end = range(length)[: int(ends[0])].stop
    return range(end - out_len, end)


def _feeds_own_reshape(ctx: AnalysisContext, name: str, source: str, depth: int = 0) -> bool:
    """Every use of ``name`` reaches, through arithmetic with constants, the target shape of
    a Reshape or the bounds of a Slice of ``source`` (both check the value). A Reshape of
    another tensor is safe when that tensor carries the same units as ``source``: recorded
    here, checked after the analysis (``AnalysisContext.same_channels_later``)."""
    users = ctx.index.consumers.get(name, [])
    if not users or depth > 8:
        return False
    for user in users:
        if user.op_type == "Concat":
            reshapes = _target_readers(ctx, user.output[0])
            ok = bool(reshapes)
            for r in reshapes if ok else []:
                if r.input[0] != source:  # checked once the whole graph is analysed
                    ctx.same_channels_later(source, r.input[0], f"Reshape '{r.name}'", r.name)
        elif user.op_type == "Slice":
            ok = user.input[0] == source and name in user.input[1:3]
        elif user.op_type in _ARITH:
            others = [i for i in user.input if i != name]
            by_dims = user.op_type == "Mul"  # B * C * nh: times dims pruning does not change
            ok = all(
                ctx.const(i) is not None or (by_dims and _dim_read(ctx, i)) for i in others
            ) and _feeds_own_reshape(
                ctx, user.output[0], source, depth + 1
            )
        else:
            ok = False
        if not ok:
            return False
    return True


_ARITH = ("Unsqueeze", "Squeeze", "Cast", "Add", "Sub", "Mul", "Div")


def runtime_value(ctx: AnalysisContext, name: str, source: str, channels: int) -> int | None:
    """Evaluate a scalar shape expression of ``Shape(source)[channel axis]`` at a channel
    count ``channels``; None when ``name`` is anything else."""
    value = ctx.const(name)
    if value is not None:
        return int(np.asarray(value).ravel()[0]) if value.size == 1 else None
    node = ctx.index.producer.get(name)
    if node is None:
        return None
    if node.op_type == "Gather":
        shape = ctx.index.producer.get(node.input[0])
        lay = ctx.layout(source)
        index = ctx.const(node.input[1])
        if shape is None or shape.op_type != "Shape" or shape.input[0] != source or lay is None:
            return None
        if index is None or int(np.asarray(index).ravel()[0]) != lay.axis:
            return None
        return channels
    if node.op_type in ("Unsqueeze", "Squeeze", "Cast"):
        return runtime_value(ctx, node.input[0], source, channels)
    if node.op_type in ("Add", "Sub", "Mul", "Div"):
        a = runtime_value(ctx, node.input[0], source, channels)
        b = runtime_value(ctx, node.input[1], source, channels)
        if a is None or b is None or (node.op_type == "Div" and b == 0):
            return None
        return {"Add": a + b, "Sub": a - b, "Mul": a * b, "Div": a // b}[node.op_type]
    return None
