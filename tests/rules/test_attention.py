"""MatMul between activations (``idap_onnx.oprules.attention``): heads on a batch axis couple
Q, K and V head by head; channels on the contracted axis couple the operands; channels on M or
N pass to the output."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import (
    analyze,
    assert_declined,
    assert_exact,
    assert_frozen,
    group_of,
    init,
    node,
    parse,
)

from idap_onnx.accounting import model_cost
from idap_onnx.group_costs import group_macs, predict_macs, prunable_share
from idap_onnx.passes.prune_channels import prune_channels

B, S, D, H, HD = 1, 5, 12, 3, 4


def i64(*values: int) -> np.ndarray:
    return np.array(values, np.int64)


SPLIT_SHAPES = {
    "constant heads": i64(0, 0, H, HD),
    "-1 for heads": i64(0, 0, -1, HD),
    "-1 for head_dim": i64(B, S, H, -1),
}
MERGE_SHAPES = {
    "constant heads": i64(0, 0, D),
    "-1 for heads": i64(0, 0, -1),
    "-1 for head_dim": i64(B, S, D),
}


def mha(split_shape: np.ndarray, merge_shape: np.ndarray, opset: int = 17, q_lines: str = "",
        **inits):
    """Multi-head self-attention on x [B,S,D] with H heads of HD channels; ``q_lines`` (ending
    in ``qr = ...``) reshape the heads ``qt`` before the scores, with their ``inits``."""
    q_final = "qr" if q_lines else "qt"
    return parse(
        f"""
        g (float[{B},{S},{D}] x) => (float[{B},{S},{D}] y) {{
            q = MatMul(x, Wq)
            k = MatMul(x, Wk)
            v = MatMul(x, Wv)
            qb = Add(q, Bq)
            qh = Reshape(qb, split)
            kh = Reshape(k, split)
            vh = Reshape(v, split)
            qt = Transpose<perm=[0,2,1,3]>(qh)
            kt = Transpose<perm=[0,2,3,1]>(kh)
            vt = Transpose<perm=[0,2,1,3]>(vh)
            {q_lines}
            scores = MatMul({q_final}, kt)
            scaled = Div(scores, scale)
            probs = Softmax<axis=-1>(scaled)
            ctx = MatMul(probs, vt)
            ct = Transpose<perm=[0,2,1,3]>(ctx)
            merged = Reshape(ct, merge)
            o = MatMul(merged, Wo)
            y = Add(o, Bo)
        }}""",
        opset,
        Wq=(D, D),
        Wk=(D, D),
        Wv=(D, D),
        Bq=(D,),
        Wo=(D, D),
        Bo=(D,),
        split=split_shape,
        merge=merge_shape,
        scale=np.array(np.sqrt(HD), np.float32),
        **inits,
    )


@pytest.mark.parametrize("opset", [11, 13, 17])
@pytest.mark.parametrize("style", list(SPLIT_SHAPES))
def test_multi_head_attention_prunes_whole_heads_exactly(style, opset):
    model = mha(SPLIT_SHAPES[style], MERGE_SHAPES[style], opset)
    graph = analyze(model)
    group = group_of(graph, "q")
    assert group.producers == ("k", "q", "v")
    assert group.size == H  # one unit per head: its Q, K and V channels
    assert set(group.consumers) >= {"o"}
    for unit, head in zip(group.units, range(H), strict=True):
        for chans in unit.values():
            assert sorted(chans.tolist()) == list(range(head * HD, (head + 1) * HD))
    pruned = assert_exact(model, {"q": [1]})
    assert init(pruned, "q:1").shape == (D, D - HD)
    assert init(pruned, "o:1").shape == (D - HD, D)
    assert init(pruned, "qb:1").shape == (D - HD,)


def test_the_attention_products_count_among_the_macs_heads_shrink():
    model = mha(SPLIT_SHAPES["constant heads"], MERGE_SHAPES["constant heads"])
    graph, cost = analyze(model), model_cost(model)
    macs = {n.name: n.macs for n in cost.nodes}
    heads = group_of(graph, "q")
    # Q K^T and P V lose a head's MACs with the head, as predict_macs counts
    assert group_macs(graph, cost)[heads.id] == sum(
        macs[n] for n in ("q", "k", "v", "o", "scores", "ctx")
    )
    assert prunable_share(graph, cost) == 1.0
    removal = {heads.id: [1]}
    assert predict_macs(graph, cost, removal) == model_cost(
        prune_channels(model, removal, graph=graph)
    ).macs


def test_attention_heads_rewrite_constant_shapes():
    model = mha(SPLIT_SHAPES["constant heads"], MERGE_SHAPES["constant heads"])
    pruned = assert_exact(model, {"k": [0, 2]})
    assert init(pruned, "qh:1").tolist() == [0, 0, 1, HD]
    assert init(pruned, "merged:1").tolist() == [0, 0, HD]


def test_heads_flattened_and_restored_from_the_run_time_shape():
    """dynamo's decomposed attention flattens Q to ``[B*H, S, HD]`` and restores it with
    ``Concat(Shape(q)[:-2], Shape(q)[-2:-1], Shape(q)[-1:])``: the heads entry is read from
    the pruned tensor itself, so whole heads still prune exactly."""
    q_lines = """
            qs = Shape(qt)
            lead = Slice(qs, zero, minus2)
            mid = Slice(qs, minus2, minus1)
            last = Slice(qs, minus1, big)
            flat_shape = Concat<axis=0>(minus1, mid, last)
            qf = Reshape(qt, flat_shape)
            back_shape = Concat<axis=0>(lead, mid, last)
            qr = Reshape(qf, back_shape)"""
    model = mha(SPLIT_SHAPES["constant heads"], MERGE_SHAPES["constant heads"], q_lines=q_lines,
                zero=i64(0), minus2=i64(-2), minus1=i64(-1), big=i64(2**62))
    assert group_of(analyze(model), "q").size == H
    pruned = assert_exact(model, {"q": [1]})
    assert init(pruned, "q:1").shape == (D, D - HD)


def test_attention_output_projection_is_its_own_group():
    model = mha(SPLIT_SHAPES["constant heads"], MERGE_SHAPES["constant heads"])
    assert_frozen(analyze(model), "o", "reaches graph output 'y'")


def single_head_attention():
    return parse(
        f"""
        g (float[{B},{S},{D}] x) => (float[{B},{S},{D}] y) {{
            q = MatMul(x, Wq)
            k = MatMul(x, Wk)
            v = MatMul(x, Wv)
            kt = Transpose<perm=[0,2,1]>(k)
            scores = MatMul(q, kt)
            probs = Softmax<axis=-1>(scores)
            ctx = MatMul(probs, v)
            y = MatMul(ctx, Wo)
        }}""",
        Wq=(D, 6),
        Wk=(D, 6),
        Wv=(D, 7),
        Wo=(7, D),
    )


def test_single_head_qk_channels_are_contracted_together():
    model = single_head_attention()
    graph = analyze(model)
    qk = group_of(graph, "q")
    assert qk.producers == ("k", "q") and qk.size == 6
    assert "scores" in qk.consumers
    assert_exact(model, {"q": [0, 5]})


def test_single_head_v_channels_pass_to_the_context():
    model = single_head_attention()
    graph = analyze(model)
    assert graph.layouts["ctx"].axis == 2
    assert group_of(graph, "v").consumers == ("y",)
    assert_exact(model, {"v": [3]})


# -- declines ---------------------------------------------------------------------------------


def test_contracted_channels_on_one_side_only_declines():
    model = parse(
        f"""
        g (float[{B},{S},{D}] x, float[{B},6,{S}] kt) => (float[{B},{S},{S}] y) {{
            q = MatMul(x, Wq)
            y = MatMul(q, kt)
        }}""",
        Wq=(D, 6),
    )
    graph = analyze(model)
    assert_declined(graph, "y", "contracted channels on one side only")
    assert_frozen(graph, "q", "one side only")


def test_channels_on_both_output_axes_decline():
    model = parse(
        f"""
        g (float[{B},{S},{D}] x) => (float[{B},6,7] y) {{
            a = MatMul(x, Wa)
            b = MatMul(x, Wb)
            at = Transpose<perm=[0,2,1]>(a)
            y = MatMul(at, b)
        }}""",
        Wa=(D, 6),
        Wb=(D, 7),
    )
    assert_declined(analyze(model), "y", "channels on two output axes")


def test_heads_batched_with_an_untracked_tensor_are_fixed():
    model = parse(
        f"""
        g (float[{B},{S},{D}] x, float[{B},{H},{HD},{S}] kt) => (float[{B},{H},{S},{S}] y) {{
            q = MatMul(x, Wq)
            qh = Reshape(q, split)
            qt = Transpose<perm=[0,2,1,3]>(qh)
            y = MatMul(qt, kt)
        }}""",
        Wq=(D, D),
        split=SPLIT_SHAPES["constant heads"],
    )
    assert_frozen(analyze(model), "q", "batches channels with untracked 'kt'")


def test_contracting_within_heads_declines():
    model = parse(
        f"""
        g (float[{B},{S},{D}] x, float[{B},{S},{HD},2] w) => (float[{B},{S},{H},2] y) {{
            q = MatMul(x, Wq)
            qh = Reshape(q, split)
            y = MatMul(qh, w)
        }}""",
        Wq=(D, D),
        split=SPLIT_SHAPES["constant heads"],
    )
    assert_declined(analyze(model), "y", "contracts within heads")


def test_matmul_with_a_1d_operand_declines():
    model = parse(
        f"""
        g (float[{B},{S},{D}] x, float[6] w) => (float[{B},{S}] y) {{
            q = MatMul(x, Wq)
            y = MatMul(q, w)
        }}""",
        Wq=(D, 6),
    )
    assert_declined(analyze(model), "y", "1-D operand")


# -- other attention spellings ----------------------------------------------------------------


def test_packed_qkv_projection_split_into_heads():
    model = parse(
        f"""
        g (float[{B},{S},{D}] x) => (float[{B},{S},{D}] y) {{
            qkv = MatMul(x, Wqkv)
            q, k, v = Split<axis=2>(qkv, sizes)
            qh = Reshape(q, split)
            kh = Reshape(k, split)
            vh = Reshape(v, split)
            qt = Transpose<perm=[0,2,1,3]>(qh)
            kt = Transpose<perm=[0,2,3,1]>(kh)
            vt = Transpose<perm=[0,2,1,3]>(vh)
            scores = MatMul(qt, kt)
            probs = Softmax<axis=-1>(scores)
            ctx = MatMul(probs, vt)
            ct = Transpose<perm=[0,2,1,3]>(ctx)
            merged = Reshape(ct, merge)
            y = MatMul(merged, Wo)
        }}""",
        13,
        Wqkv=(D, 3 * D),
        Wo=(D, D),
        sizes=i64(D, D, D),
        split=SPLIT_SHAPES["constant heads"],
        merge=MERGE_SHAPES["constant heads"],
    )
    group = group_of(analyze(model), "qkv")
    assert group.size == H
    # head 1 holds its Q, K and V columns of the one packed projection
    (chans,) = group.units[1].values()
    assert chans.tolist() == [4, 5, 6, 7, 16, 17, 18, 19, 28, 29, 30, 31]
    pruned = assert_exact(model, {"qkv": [1]})
    assert init(pruned, "q:1").tolist() == [D - HD] * 3
    assert init(pruned, "qkv:1").shape == (D, 3 * (D - HD))


UNBIND = {
    "Gather": """
            q = Gather<axis=0>(qkvt, i0)
            k = Gather<axis=0>(qkvt, i1)
            v = Gather<axis=0>(qkvt, i2)""",
    "Split and Squeeze": """
            q1, k1, v1 = Split<axis=0>(qkvt, ones)
            q = Squeeze(q1, ax0)
            k = Squeeze(k1, ax0)
            v = Squeeze(v1, ax0)""",
}


@pytest.mark.parametrize("unbind", list(UNBIND))
def test_packed_qkv_reshaped_to_three_by_heads_prunes_whole_heads(unbind):
    """timm's ``Attention``: one Linear to 3*D, ``reshape(B, N, 3, H, HD).permute(2, 0, 3, 1,
    4).unbind(0)``. The reshape splits the packed axis into Q, K and V blocks of heads: head h
    of all three is one unit, the target's heads entry is rewritten."""
    model = parse(
        f"""
        g (float[{B},{S},{D}] x) => (float[{B},{S},{D}] y) {{
            qkv = MatMul(x, Wqkv)
            qkvb = Add(qkv, Bqkv)
            qkvh = Reshape(qkvb, split5)
            qkvt = Transpose<perm=[2,0,3,1,4]>(qkvh){UNBIND[unbind]}
            kt = Transpose<perm=[0,1,3,2]>(k)
            scores = MatMul(q, kt)
            probs = Softmax<axis=-1>(scores)
            ctx = MatMul(probs, v)
            ct = Transpose<perm=[0,2,1,3]>(ctx)
            merged = Reshape(ct, merge)
            y = MatMul(merged, Wo)
        }}""",
        13,
        Wqkv=(D, 3 * D),
        Bqkv=(3 * D,),
        Wo=(D, D),
        split5=i64(B, S, 3, H, HD),
        merge=i64(B, S, D),
        i0=np.array(0, np.int64),
        i1=np.array(1, np.int64),
        i2=np.array(2, np.int64),
        ones=i64(1, 1, 1),
        ax0=i64(0),
    )
    group = group_of(analyze(model), "qkv")
    assert group.size == H and not group.frozen
    (chans,) = group.units[1].values()  # head 1: its Q, K and V columns
    assert chans.tolist() == [4, 5, 6, 7, 16, 17, 18, 19, 28, 29, 30, 31]
    pruned = assert_exact(model, {"qkv": [1]})
    assert init(pruned, "qkv:1").shape == (D, 3 * (D - HD))
    assert init(pruned, "qkvh:1").tolist() == [B, S, 3, H - 1, HD]
    assert init(pruned, "merged:1").tolist() == [B, S, D - HD]


def test_a_split_into_four_dims_declines_naming_them():
    model = parse(
        f"""
        g (float[{B},{S},{D}] x) => (float[{B},{S},3,2,3,2] y) {{
            qkv = MatMul(x, Wqkv)
            y = Reshape(qkv, split6)
        }}""",
        13,
        Wqkv=(D, 3 * D),
        split6=i64(B, S, 3, 2, 3, 2),
    )
    assert_declined(analyze(model), "y", r"split of the channel axis into \[3, 2, 3, 2\]")


def test_head_size_and_merged_width_read_from_the_residual_at_run_time():
    """Swin's and PVT's legacy exports: ``C = x.shape[-1]`` of the residual ``x`` spells the
    head size ``C // H`` of the Q/K/V reshapes and the width of the merge back. The heads stay
    prunable: the residual width is kept (its group fixed, the head size stays right) and the
    merge's run-time width becomes the kept count, a constant."""
    model = parse(
        f"""
        g (float[{B},{S},{D}] inp) => (float[{B},{S},{D}] y) {{
            x = MatMul(inp, Wx)
            q = MatMul(x, Wq)
            k = MatMul(x, Wk)
            v = MatMul(x, Wv)
            sx = Shape(x)
            c = Gather(sx, i2)
            hd = Div(c, nh_scalar)
            hd1 = Unsqueeze(hd, ax0)
            split = Concat<axis=0>(bs, nh, hd1)
            qh = Reshape(q, split)
            kh = Reshape(k, split)
            vh = Reshape(v, split)
            qt = Transpose<perm=[0,2,1,3]>(qh)
            kt = Transpose<perm=[0,2,3,1]>(kh)
            vt = Transpose<perm=[0,2,1,3]>(vh)
            scores = MatMul(qt, kt)
            probs = Softmax<axis=-1>(scores)
            ctx = MatMul(probs, vt)
            ct = Transpose<perm=[0,2,1,3]>(ctx)
            c1 = Unsqueeze(c, ax0)
            merge = Concat<axis=0>(bs, c1)
            merged = Reshape(ct, merge)
            o = MatMul(merged, Wo)
            r = Add(o, x)
            y = MatMul(r, Wy)
        }}""",
        13,
        Wx=(D, D),
        Wq=(D, D),
        Wk=(D, D),
        Wv=(D, D),
        Wo=(D, D),
        Wy=(D, D),
        i2=np.array(2, np.int64),
        nh_scalar=np.array(H, np.int64),
        ax0=i64(0),
        bs=i64(B, S),
        nh=i64(H),
    )
    graph = analyze(model)
    heads = group_of(graph, "q")
    assert heads.size == H and not heads.frozen
    assert_frozen(graph, "x", "its width sets the head size of Reshape 'qh'")
    pruned = assert_exact(model, {"q": [1]})
    assert init(pruned, "q:1").shape == (D, D - HD)
    merge_piece = node(pruned, "merge").input[1]
    assert init(pruned, merge_piece).tolist() == [D - HD]  # was Shape(x)[2] at run time


def test_a_head_size_read_from_the_split_tensor_itself_splits_rows_not_heads():
    # [B, S, D] -> [B, S, H, D // H] with D read from q itself: as a head size it would not
    # follow the pruning of whole heads, as the length of H joined rows it does, so channel j
    # of every head is one unit
    model = parse(
        f"""
        g (float[{B},{S},{D}] x) => (float[{B},{S},{D}] y) {{
            q = MatMul(x, Wq)
            sq = Shape(q)
            c = Gather(sq, i2)
            hd = Div(c, nh_scalar)
            hd1 = Unsqueeze(hd, ax0)
            split = Concat<axis=0>(bs, nh, hd1)
            qh = Reshape(q, split)
            r = Relu(qh)
            merged = Reshape(r, merge)
            y = MatMul(merged, Wo)
        }}""",
        13,
        Wq=(D, D),
        Wo=(D, D),
        i2=np.array(2, np.int64),
        nh_scalar=np.array(H, np.int64),
        ax0=i64(0),
        bs=i64(B, S),
        nh=i64(H),
        merge=i64(B, S, -1),
    )
    group = group_of(analyze(model), "q")
    assert [sorted(int(c) for c in unit[group.spaces[0]]) for unit in group.units][:2] == [
        [0, HD, 2 * HD], [1, HD + 1, 2 * HD + 1],
    ]  # fmt: skip
    pruned = assert_exact(model, {"q": [1]})
    assert init(pruned, "q:1").shape == (D, D - H)
    assert node(pruned, "hd").op_type == "Div"  # the run-time head size follows the pruning


def test_attention_with_run_time_batch_and_length_dims():
    # HF: q.view(bsz, q_len, num_heads, head_dim) with bsz, q_len read from Shape(x)
    model = parse(
        f"""
        g (float[{B},{S},{D}] x) => (float[{B},{S},{D}] y) {{
            q = MatMul(x, Wq)
            k = MatMul(x, Wk)
            v = MatMul(x, Wv)
            sx = Shape(x)
            b = Gather(sx, i0)
            s = Gather(sx, i1)
            b1 = Unsqueeze(b, ax0)
            s1 = Unsqueeze(s, ax0)
            split = Concat<axis=0>(b1, s1, nh, hd)
            qh = Reshape(q, split)
            kh = Reshape(k, split)
            vh = Reshape(v, split)
            qt = Transpose<perm=[0,2,1,3]>(qh)
            kt = Transpose<perm=[0,2,3,1]>(kh)
            vt = Transpose<perm=[0,2,1,3]>(vh)
            scores = MatMul(qt, kt)
            probs = Softmax<axis=-1>(scores)
            ctx = MatMul(probs, vt)
            ct = Transpose<perm=[0,2,1,3]>(ctx)
            merge = Concat<axis=0>(b1, s1, dm)
            merged = Reshape(ct, merge)
            y = MatMul(merged, Wo)
        }}""",
        13,
        Wq=(D, D),
        Wk=(D, D),
        Wv=(D, D),
        Wo=(D, D),
        i0=np.array(0, np.int64),
        i1=np.array(1, np.int64),
        ax0=i64(0),
        nh=i64(H),
        hd=i64(HD),
        dm=i64(D),
    )
    group = group_of(analyze(model), "q")
    assert group.size == H and not group.frozen
    pruned = assert_exact(model, {"q": [0, 2]})
    assert init(pruned, "split:2").tolist() == [1]
    assert init(pruned, "merge:2").tolist() == [HD]


# -- heads that other ops would cut apart ------------------------------------------------------


def heads_then(lines: str, out: str, opset: int = 13, **inits):
    """x [1,5,12] -> MatMul 'q' -> Reshape 'qh' [1,5,3,4] (3 heads of 4) -> <lines: y = ...>."""
    return parse(
        f"""
        g (float[{B},{S},{D}] x) => (float[{out}] y) {{
            q = MatMul(x, Wq)
            qh = Reshape(q, split)
            {lines}
        }}""",
        opset,
        Wq=(D, D),
        split=SPLIT_SHAPES["constant heads"],
        **inits,
    )


def test_slice_within_heads_declines():
    # RoPE-style x[..., : head_dim // 2]
    model = heads_then("y = Slice(qh, zero, two, last)", f"{B},{S},{H},2",
                       zero=i64(0), two=i64(2), last=i64(3))  # fmt: skip
    graph = analyze(model)
    assert graph.layouts["qh"].fold == HD and graph.layouts["qh"].inner == 3
    assert_declined(graph, "y", "slices within heads")


def test_split_within_heads_declines():
    model = parse(
        f"""
        g (float[{B},{S},{D}] x) => (float[{B},{S},{H},2] y, float[{B},{S},{H},2] z) {{
            q = MatMul(x, Wq)
            qh = Reshape(q, split)
            y, z = Split<axis=3>(qh)
        }}""",
        13,
        Wq=(D, D),
        split=SPLIT_SHAPES["constant heads"],
    )
    assert_declined(analyze(model), "y", "splits heads")


def test_reshape_separating_a_head_from_its_channels_declines():
    model = heads_then(
        "t = Transpose<perm=[0,2,1,3]>(qh)\n y = Reshape(t, shape)",
        f"{B},{H},{S * HD}",
        shape=i64(B, H, S * HD),
    )
    assert_declined(analyze(model), "y", "separates a head from its channels")


def test_reshape_merging_heads_with_tokens_declines():
    model = heads_then("y = Reshape(qh, shape)", f"{B},{S * H},{HD}", shape=i64(B, S * H, HD))
    assert_declined(analyze(model), "y", "Reshape 'y'")


# -- dynamo-exported attention ------------------------------------------------------------------

DB = 2  # a batch of two, so the flattened [B*S, D] rows really mix batch and tokens


def dynamo_mha():
    """Attention as ``torch.onnx.export(dynamo=True)`` writes it: Gemm on ``[B*S, D]`` rows,
    the heads split by a run-time target ``Concat(Shape(x)[0], Shape(x)[1], H, HD)``, and
    the heads merged back by a constant ``[-1, D]`` that folds batch and tokens too."""
    return parse(
        f"""
        g (float[{DB},{S},{D}] x) => (float[{DB},{S},{D}] y) {{
            x2 = Reshape(x, flat)
            q = Gemm(x2, Wq, Bq)
            k = Gemm(x2, Wk)
            v = Gemm(x2, Wv)
            s = Shape(x)
            b = Gather(s, i0)
            n = Gather(s, i1)
            b1 = Unsqueeze(b, ax0)
            n1 = Unsqueeze(n, ax0)
            heads = Concat<axis=0>(b1, n1, hh, hd)
            qh = Reshape<allowzero=1>(q, heads)
            kh = Reshape<allowzero=1>(k, heads)
            vh = Reshape<allowzero=1>(v, heads)
            qt = Transpose<perm=[0,2,1,3]>(qh)
            kt = Transpose<perm=[0,2,3,1]>(kh)
            vt = Transpose<perm=[0,2,1,3]>(vh)
            scores = MatMul(qt, kt)
            probs = Softmax<axis=-1>(scores)
            ctx = MatMul(probs, vt)
            ct = Transpose<perm=[0,2,1,3]>(ctx)
            merged = Reshape(ct, flat)
            o = Gemm(merged, Wo, Bo)
            back = Concat<axis=0>(b1, n1, dd)
            y = Reshape<allowzero=1>(o, back)
        }}""",
        14,
        Wq=(D, D),
        Wk=(D, D),
        Wv=(D, D),
        Bq=(D,),
        Wo=(D, D),
        Bo=(D,),
        flat=i64(-1, D),
        i0=np.array(0, np.int64),
        i1=np.array(1, np.int64),
        ax0=i64(0),
        hh=i64(H),
        hd=i64(HD),
        dd=i64(D),
    )


def test_dynamo_heads_merged_with_batch_rows_are_pruned_whole():
    model = dynamo_mha()
    graph = analyze(model)
    assert "merged" not in graph.declined, graph.declined
    group = group_of(graph, "q")
    assert group.producers == ("k", "q", "v") and group.size == H and not group.frozen
    assert graph.layouts["merged"].axis == 1 and len(graph.layouts["merged"]) == D
    pruned = assert_exact(model, {"q": [0, 2]})
    assert init(pruned, "q:1").shape == (D, HD)
    assert init(pruned, "o:1").shape == (HD, D)
    assert init(pruned, "merged:1").tolist() == [-1, HD]
    # the run-time target Concat is copied for each Reshape, its head count rewritten
    heads = {n.input[1] for n in pruned.graph.node if n.name in ("qh", "kh", "vh")}
    assert len(heads) == 3
    for n in pruned.graph.node:
        if n.output[0] in heads:
            assert init(pruned, f"{n.name}:2").tolist() == [1]


def test_reshape_merging_heads_with_tokens_and_batch_is_pruned_whole():
    # [1,S,H,HD] -> [S, H*HD] (the merge dynamo writes with a constant [-1, D])
    model = heads_then("t = Reshape(qh, shape)\n y = MatMul(t, Wo)", f"{S},{D}",
                       shape=i64(-1, D), Wo=(D, D))  # fmt: skip
    graph = analyze(model)
    assert graph.layouts["t"].axis == 1 and graph.layouts["t"].fold == 1
    assert group_of(graph, "q").size == H
    pruned = assert_exact(model, {"q": [1]})
    assert init(pruned, "t:1").tolist() == [-1, D - HD]


def test_reshape_merging_heads_with_an_unsplittable_run_declines_with_the_dims():
    # [1,S,H,HD] -> [2*S, H*HD/2]: no output axis holds exactly the heads and their channels
    model = heads_then("y = Reshape(qh, shape)", f"{2 * S},{H * HD // 2}",
                       shape=i64(2 * S, H * HD // 2))  # fmt: skip
    graph = analyze(model)
    assert_declined(graph, "y", r"channel axis mixed with other dims \(input dims")
    assert_declined(graph, "y", "needs the channel axis")


def test_reshape_copying_another_dim_into_the_channel_entry_declines():
    # [1, 12 tokens, 12 channels] -> [12, 0]: the 0 copies the token dim, not the channels
    model = parse(
        """
        g (float[1,12,12] x) => (float[12,12] y) {
            q = MatMul(x, Wq)
            y = Reshape(q, shape)
        }""",
        Wq=(12, 12),
        shape=i64(12, 0),
    )
    assert_declined(analyze(model), "y", "target entry 1 is 0")


def tied_lm_head(shared: bool = False):
    """Embedding table E [V, D] read by Gather and, transposed, by the output MatMul (GPT-2's
    tied ``lm_head`` as the dynamo exporter writes it: ``MatMul(h, Transpose(E))``)."""
    extra = "z = MatMul(r, et)" if shared else "z = Identity(y)"
    return parse(
        f"""
        g (int64[{B},{S}] ids) => (float[{B},{S},7] y, float[{B},{S},7] z) {{
            e = Gather(E, ids)
            h = MatMul(e, W1)
            a = Relu(h)
            n = MatMul(a, W2)
            r = Add(e, n)
            et = Transpose<perm=[1,0]>(E)
            y = MatMul(r, et)
            {extra}
        }}""",
        E=(7, D),
        W1=(D, 5),
        W2=(5, D),
    ), {"ids": np.random.default_rng(0).integers(0, 7, (B, S)).astype(np.int64)}


def test_tied_output_projection_through_transpose_slices_the_table():
    model, feeds = tied_lm_head()
    graph = analyze(model)
    assert "y" not in graph.declined, graph.declined
    tied = group_of(graph, "e")
    assert tied.producers == ("e", "n") and set(tied.consumers) >= {"h", "y"}
    assert not tied.frozen, tied.frozen_reasons
    assert_frozen(graph, "y", "reads its weight through Transpose 'et'")
    pruned = assert_exact(model, {"e": [1, 4], "h": [0]}, feeds)
    assert init(pruned, "e:0").shape == (7, D - 2)
    assert init(pruned, "et:0").shape == (7, D - 2)
    assert init(pruned, "h:1").shape == (D - 2, 4)
    assert init(pruned, "n:1").shape == (4, D - 2)


def test_tied_transpose_read_by_two_matmuls_declines_with_what_is_needed():
    model, _ = tied_lm_head(shared=True)
    graph = analyze(model)
    assert_declined(graph, "y", "contracted channels on one side only")
    assert_declined(graph, "y", "'et'.*Transpose of a constant read by this MatMul only")


#: the constants of torch's legacy MHA views: ``bsz = Shape(x)[1]``, ``bsz * num_heads``
LEGACY_MHA_SHAPES = {
    "i1": np.array(1, np.int64),
    "nh_scalar": np.array(H, np.int64),
    "ax0": i64(0),
    "s": i64(S),
    "hd": i64(HD),
    "merge": i64(S, B, D),
}


def test_torch_legacy_mha_merges_the_batch_with_the_heads():
    # F.multi_head_attention_forward: q.view(tgt_len, bsz * num_heads, head_dim), bsz read at
    # run time, one Mul shared by q, k and v; the batch is 1 where the layout is taken, so the
    # constant num_heads becomes the kept count (a 0-d constant stays 0-d)
    model = parse(
        f"""
        g (float[{S},{B},{D}] x) => (float[{S},{B},{D}] y) {{
            q = MatMul(x, Wq)
            k = MatMul(x, Wk)
            v = MatMul(x, Wv)
            sx = Shape(x)
            b = Gather(sx, i1)
            bh = Mul(b, nh_scalar)
            bh1 = Unsqueeze(bh, ax0)
            q_split = Concat<axis=0>(s, bh1, hd)
            k_split = Concat<axis=0>(s, bh1, hd)
            v_split = Concat<axis=0>(s, bh1, hd)
            qh = Reshape(q, q_split)
            kh = Reshape(k, k_split)
            vh = Reshape(v, v_split)
            qt = Transpose<perm=[1,0,2]>(qh)
            kt = Transpose<perm=[1,2,0]>(kh)
            vt = Transpose<perm=[1,0,2]>(vh)
            scores = MatMul(qt, kt)
            probs = Softmax<axis=-1>(scores)
            ctx = MatMul(probs, vt)
            ct = Transpose<perm=[1,0,2]>(ctx)
            merged = Reshape(ct, merge)
            y = MatMul(merged, Wo)
        }}""",
        13,
        Wq=(D, D),
        Wk=(D, D),
        Wv=(D, D),
        Wo=(D, D),
        **LEGACY_MHA_SHAPES,
    )
    graph = analyze(model)
    heads = group_of(graph, "q")
    assert heads.size == H and not heads.frozen
    pruned = assert_exact(model, {"q": [1]})
    assert init(pruned, "bh:1").shape == () and int(init(pruned, "bh:1")) == H - 1
    assert init(pruned, "merged:1").tolist() == [S, B, D - HD]
    assert init(pruned, "v:1").shape == (D, D - HD)


def test_a_batch_times_heads_shared_with_other_heads_fixes_both():
    # the same bsz * num_heads also shapes the heads of p, which are not q's: rewriting the
    # constant for one would break the other, so both are fixed
    model = parse(
        f"""
        g (float[{S},{B},{D}] x) => (float[{S},{B},{D}] y) {{
            q = MatMul(x, Wq)
            p = MatMul(x, Wp)
            sx = Shape(x)
            b = Gather(sx, i1)
            bh = Mul(b, nh_scalar)
            bh1 = Unsqueeze(bh, ax0)
            q_split = Concat<axis=0>(s, bh1, hd)
            p_split = Concat<axis=0>(s, bh1, hd)
            qh = Reshape(q, q_split)
            ph = Reshape(p, p_split)
            qr = Relu(qh)
            pm = Reshape(ph, merge)
            qm = Reshape(qr, merge)
            yq = MatMul(qm, Wo)
            yp = MatMul(pm, Wo2)
            y = Add(yq, yp)
        }}""",
        13,
        Wq=(D, D),
        Wp=(D, D),
        Wo=(D, D),
        Wo2=(D, D),
        **LEGACY_MHA_SHAPES,
    )
    graph = analyze(model)
    assert_frozen(graph, "q", "shaped by the channel count")
    assert_frozen(graph, "p", "shaped by the channel count")
