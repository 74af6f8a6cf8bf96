"""Parameter and MAC accounting, checked against hand-computed values and published counts.

Each tiny graph states its expected count as the formula from ``idap_onnx.accounting``, written
out with the graph's numbers, so a failing test shows which term is off.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import onnx.parser
import pytest
from onnx import numpy_helper
from tools_loader import load_tool

from idap_onnx import accounting
from idap_onnx.accounting import ModelCost, NodeCost, _conv_output_shape, format_count, model_cost
from idap_onnx.errors import UsageError
from idap_onnx.model_io import load_model
from idap_onnx.shapes import concrete_input_shapes

OPSET_17 = '<ir_version: 8, opset_import: ["" : 17]>\n'
OPSET_18 = '<ir_version: 8, opset_import: ["" : 18]>\n'
OPSET_23 = '<ir_version: 10, opset_import: ["" : 23]>\n'


def build(
    text: str, header: str = OPSET_17, **initializers: list[int] | np.ndarray
) -> onnx.ModelProto:
    """Parses a graph and adds each keyword as an initializer: an array, or float zeros of the
    given shape."""
    model = onnx.parser.parse_model(header + text)
    for name, value in initializers.items():
        array = value if isinstance(value, np.ndarray) else np.zeros(value, dtype=np.float32)
        model.graph.initializer.append(numpy_helper.from_array(array, name))
    onnx.checker.check_model(model)
    return model


def single_node_macs(cost: ModelCost) -> int:
    (node,) = [n for n in cost.nodes if n.macs]
    assert cost.unresolved == ()
    return node.macs


# --- Conv ---------------------------------------------------------------------------------


def test_conv_with_stride_2_and_padding():
    model = build(
        """
        g (float[1, 3, 32, 32] x) => (float[1, 8, 16, 16] y) {
            y = Conv <strides = [2, 2], pads = [1, 1, 1, 1]> (x, w, b)
        }
        """,
        w=[8, 3, 3, 3],
        b=[8],
    )
    cost = model_cost(model)
    # N * C_out * out_h * out_w * (C_in / group) * k_h * k_w
    assert cost.macs == 1 * 8 * 16 * 16 * 3 * 3 * 3
    assert cost.flops == 2 * cost.macs
    assert cost.params == 8 * 3 * 3 * 3 + 8


def test_grouped_conv():
    model = build(
        """
        g (float[1, 8, 10, 10] x) => (float[1, 16, 8, 8] y) {
            y = Conv <group = 4> (x, w)
        }
        """,
        w=[16, 2, 3, 3],
    )
    cost = model_cost(model)
    assert cost.macs == 1 * 16 * 8 * 8 * (8 // 4) * 3 * 3
    assert cost.params == 16 * 2 * 3 * 3


def test_depthwise_conv():
    model = build(
        """
        g (float[1, 8, 10, 10] x) => (float[1, 8, 10, 10] y) {
            y = Conv <group = 8, pads = [1, 1, 1, 1]> (x, w)
        }
        """,
        w=[8, 1, 3, 3],
    )
    assert model_cost(model).macs == 1 * 8 * 10 * 10 * 1 * 3 * 3


def test_dilated_conv():
    model = build(
        """
        g (float[1, 4, 16, 16] x) => (float[1, 4, 12, 12] y) {
            y = Conv <dilations = [2, 2]> (x, w)
        }
        """,
        w=[4, 4, 3, 3],
    )
    # A 3x3 kernel dilated by 2 spans 5 pixels: 16 - 5 + 1 = 12; the MACs per output pixel stay 9.
    assert model_cost(model).macs == 1 * 4 * 12 * 12 * 4 * 3 * 3


@pytest.mark.parametrize(
    "attributes",
    [
        "strides = [2, 3], pads = [1, 0, 2, 1]",
        "dilations = [2, 1], strides = [1, 2]",
        'auto_pad = "SAME_UPPER", strides = [2, 2]',
        'auto_pad = "SAME_LOWER", strides = [3, 2], dilations = [2, 2]',
        'auto_pad = "VALID", strides = [2, 2]',
    ],
)
def test_conv_output_shape_from_attributes_matches_onnx_inference(attributes):
    # The fallback used when shape inference leaves a Conv output unknown.
    model = build(
        f"""
        g (float[2, 4, 17, 12] x) => (float[N, C, H, W] y) {{
            y = Conv <{attributes}> (x, w)
        }}
        """,
        w=[6, 4, 3, 2],
    )
    model.graph.output[0].type.tensor_type.ClearField("shape")
    inferred = onnx.shape_inference.infer_shapes(model)
    expected = tuple(d.dim_value for d in inferred.graph.output[0].type.tensor_type.shape.dim)
    assert _conv_output_shape(model.graph.node[0], (2, 4, 17, 12), (6, 4, 3, 2)) == expected


@pytest.mark.parametrize(("group", "weight"), [(1, [8, 4, 2, 2]), (2, [8, 2, 2, 2])])
def test_conv_transpose(group, weight):
    model = build(
        f"""
        g (float[1, 8, 5, 5] x) => (float[1, C, H, W] y) {{
            y = ConvTranspose <strides = [2, 2], group = {group}> (x, w)
        }}
        """,
        w=weight,
    )
    c_out_per_group = weight[1]
    # N * C_in * in_h * in_w * (C_out / group) * k_h * k_w
    assert model_cost(model).macs == 1 * 8 * 5 * 5 * c_out_per_group * 2 * 2


# --- Gemm and MatMul ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attributes", "a_shape", "b_shape"),
    [
        ("transB = 1", [4, 32], [16, 32]),
        ("transA = 1", [32, 4], [32, 16]),
        ("transA = 1, transB = 1", [32, 4], [16, 32]),
    ],
)
def test_gemm_respects_transposes(attributes, a_shape, b_shape):
    model = build(
        f"""
        g (float[{a_shape[0]}, {a_shape[1]}] a) => (float[4, 16] y) {{
            y = Gemm <{attributes}> (a, w, c)
        }}
        """,
        w=b_shape,
        c=[16],
    )
    cost = model_cost(model)
    assert cost.macs == 4 * 16 * 32  # M * N * K; the bias add is not a MAC
    assert cost.params == 16 * 32 + 16


def test_matmul_3d_activation_by_2d_weight():
    model = build(
        """
        g (float[2, 10, 32] x) => (float[2, 10, 64] y) {
            y = MatMul(x, w)
        }
        """,
        w=[32, 64],
    )
    cost = model_cost(model)
    assert cost.macs == 2 * 10 * 64 * 32  # batch * M * N * K
    assert cost.params == 32 * 64


def test_attention_matmuls_with_symbolic_batch_and_sequence_from_input_shapes():
    model = build(
        """
        g (float[B, 4, S, 8] q, float[B, 4, 8, S] k_t, float[B, 4, S, 8] v)
            => (float[B, 4, S, 8] out) {
            scores = MatMul(q, k_t)
            probs = Softmax <axis = -1> (scores)
            out = MatMul(probs, v)
        }
        """
    )
    shapes = {"q": [2, 4, 16, 8], "k_t": [2, 4, 8, 16], "v": [2, 4, 16, 8]}
    cost = model_cost(model, shapes)
    scores, softmax, weighted = cost.nodes
    assert scores.macs == 2 * 4 * 16 * 16 * 8  # [B,H,S,D] x [B,H,D,S]: B*H * S*S * D
    assert weighted.macs == 2 * 4 * 16 * 8 * 16  # [B,H,S,S] x [B,H,S,D]: B*H * S*D * S
    assert softmax.macs == 0
    assert cost.params == 0
    # Without input_shapes, B and S fall back to default_dim.
    assert model_cost(model).macs == 2 * (1 * 4 * 1 * 1 * 8)
    assert model_cost(model, default_dim=2).macs == 2 * (2 * 4 * 2 * 2 * 8)


def test_sequence_dim_resolved_through_shape_computation():
    # Head split as exporters write it: the Reshape target is computed from Shape(x), so the
    # MatMul's shape is known only through data propagation.
    model = build(
        """
        g (float[B, S, 32] x) => (float[B, S, 4, 4] y) {
            lead = Shape <start = 0, end = 2> (x)
            heads = Constant <value = int64[2] {4, 8}> ()
            target = Concat <axis = 0> (lead, heads)
            split = Reshape(x, target)
            y = MatMul(split, w)
        }
        """,
        w=[8, 4],
    )
    cost = model_cost(model, {"x": [3, 20, 32]})
    assert cost.macs == 3 * 20 * 4 * 4 * 8
    assert cost.params == 8 * 4  # the int64 Constant is a shape, not a parameter


@pytest.mark.parametrize(
    ("a", "b", "y", "macs"),
    [
        ("[8]", "[8, 5]", "[5]", 5 * 8),  # [K] x [K, N]: N * K
        ("[3, 6, 8]", "[8]", "[3, 6]", 3 * 6 * 8),  # [B, M, K] x [K]: B * M * K
        ("[8]", "[8]", "", 8),  # dot product: K
        ("[2, 1, 6, 8]", "[3, 8, 5]", "[2, 3, 6, 5]", 2 * 3 * 6 * 5 * 8),  # broadcast batch
    ],
)
def test_matmul_follows_numpy_rules(a, b, y, macs):
    model = build(f"g (float{a} a, float{b} b) => (float{y} y) {{ y = MatMul(a, b) }}")
    assert single_node_macs(model_cost(model)) == macs


# --- Einsum, Attention, recurrent ---------------------------------------------------------


def test_einsum_with_two_operands_counts_every_index():
    model = build(
        """
        g (float[2, 4, 6, 8] q, float[2, 4, 7, 8] k) => (float[2, 4, 6, 7] y) {
            y = Einsum <equation = "bhsd,bhtd->bhst"> (q, k)
        }
        """
    )
    assert single_node_macs(model_cost(model)) == 2 * 4 * 6 * 7 * 8


def test_einsum_with_ellipsis_broadcasts_the_batch_dims():
    model = build(
        """
        g (float[5, 1, 6, 8] a, float[3, 8, 7] b) => (float[5, 3, 6, 7] y) {
            y = Einsum <equation = "...ij,...jk->...ik"> (a, b)
        }
        """
    )
    assert single_node_macs(model_cost(model)) == 5 * 3 * 6 * 8 * 7


def test_einsum_one_operand_is_free_and_three_operands_are_unresolved():
    model = build(
        """
        g (float[4, 5] a, float[5, 6] b, float[6, 7] c) => (float[5, 4] t, float[4, 7] y) {
            t = Einsum <equation = "ij->ji"> (a)
            y = Einsum <equation = "ij,jk,kl->il"> (a, b, c)
        }
        """
    )
    cost = model_cost(model)
    assert cost.macs == 0
    assert cost.unresolved == ("Einsum_1",)


def test_attention_op_with_grouped_query_heads():
    model = build(
        """
        g (float[B, 4, S, 8] q, float[B, 2, T, 8] k, float[B, 2, T, 16] v)
            => (float[B, 4, S, 16] y) {
            y = Attention(q, k, v)
        }
        """,
        header=OPSET_23,
    )
    shapes = {"q": [2, 4, 10, 8], "k": [2, 2, 6, 8], "v": [2, 2, 6, 16]}
    # B * H_q * S_q * S_kv * (D_qk + D_v)
    assert single_node_macs(model_cost(model, shapes)) == 2 * 4 * 10 * 6 * (8 + 16)


def test_attention_op_with_3d_inputs():
    model = build(
        """
        g (float[B, S, 32] q, float[B, T, 16] k, float[B, T, 32] v) => (float[B, S, 64] y) {
            y = Attention <q_num_heads = 4, kv_num_heads = 2> (q, k, v)
        }
        """,
        header=OPSET_23,
    )
    shapes = {"q": [2, 10, 32], "k": [2, 6, 16], "v": [2, 6, 32]}
    # 4 query heads of D_qk = 32 / 4 = 8, 2 kv heads of D_v = 32 / 2 = 16.
    assert single_node_macs(model_cost(model, shapes)) == 2 * 4 * 10 * 6 * (8 + 16)


def test_lstm():
    model = build(
        """
        g (float[5, 2, 3] x) => (float[5, 1, 2, 4] y) {
            y = LSTM <hidden_size = 4> (x, w, r, b)
        }
        """,
        w=[1, 4 * 4, 3],
        r=[1, 4 * 4, 4],
        b=[1, 8 * 4],
    )
    cost = model_cost(model)
    # seq * batch * (numel(W) + numel(R))
    assert cost.macs == 5 * 2 * (16 * 3 + 16 * 4)
    assert cost.params == 16 * 3 + 16 * 4 + 32


# --- parameters ---------------------------------------------------------------------------


def test_identity_alias_is_charged_to_its_reader_once():
    # The legacy torch exporter writes equal constants once and renames them with Identity.
    model = build(
        """
        g (float[1, 6] x) => (float[1, 6] y) {
            w_alias = Identity(w)
            h = MatMul(x, w_alias)
            y = MatMul(h, w_alias)
        }
        """,
        w=[6, 6],
    )
    identity, first, second = model_cost(model).nodes
    assert (identity.params, first.params, second.params) == (0, 36, 0)
    assert model_cost(model).params == 36


def test_a_weight_read_by_two_nodes_counts_once_for_the_first():
    model = build(
        """
        g (float[1, 6] x) => (float[1, 6] y) {
            h = MatMul(x, w)
            y = MatMul(h, w)
        }
        """,
        w=[6, 6],
    )
    cost = model_cost(model)
    assert [n.params for n in cost.nodes] == [36, 0]
    assert cost.by_name()["MatMul_0"] == NodeCost("MatMul_0", "MatMul", 36, 6 * 6)


def test_integer_tensors_resize_scales_and_unused_weights_are_not_parameters():
    model = build(
        """
        g (float[1, 2, 4, 4] x) => (float[1, 192] y) {
            up = Resize <mode = "nearest"> (x, roi, scales)
            h = Conv <pads = [1, 1, 1, 1]> (up, w)
            y = Reshape(h, shape)
        }
        """,
        roi=[0],
        scales=np.array([1, 1, 2, 2], dtype=np.float32),
        w=[3, 2, 3, 3],
        shape=np.array([1, -1], dtype=np.int64),
        unused=[100],
    )
    cost = model_cost(model)
    assert cost.params == 3 * 2 * 3 * 3
    # The Resize scales reached shape inference, so the Conv sees the 8x8 upsampled input.
    assert cost.macs == 1 * 3 * 8 * 8 * 2 * 3 * 3


def test_float_constant_nodes_count_as_parameters():
    model = build(
        """
        g (float[1, 3] x) => (float[1, 2] y) {
            w = Constant <value = float[3, 2] {1, 2, 3, 4, 5, 6}> ()
            y = MatMul(x, w)
        }
        """
    )
    constant, matmul = model_cost(model).nodes
    assert (constant.params, matmul.params, matmul.macs) == (0, 6, 2 * 3)


# --- shapes, errors and immutability ------------------------------------------------------


def test_unknown_shapes_leave_the_node_unresolved():
    model = build(
        """
        g (float[1, 4] x) => (float[1, 4] y) {
            h = custom.Opaque(x)
            y = MatMul(h, w)
        }
        """,
        header='<ir_version: 8, opset_import: ["" : 17, "custom" : 1]>\n',
        w=[4, 4],
    )
    cost = model_cost(model)
    assert (cost.macs, cost.unresolved, cost.params) == (0, ("MatMul_1",), 16)


def causal_attention_as_dynamo_exports_it() -> onnx.ModelProto:
    """One attention layer whose mask is built as dynamo exports build it (issue 17): ``Range``
    over ``Shape`` of the token ids for the positions and for the batch, so ONNX inference
    leaves the mask's dims unknown, and shape folding (onnx-graphsurgeon) cannot run the
    ``Range``. At batch 1 the unknown mask batch broadcasts into the scores, so the second
    attention MatMul and the output Gemm have an unknown batch."""
    scalar = {
        name: np.array(value, dtype=dtype)
        for name, value, dtype in [
            ("zero", 0, np.int64), ("one", 1, np.int64),
            ("fzero", 0, np.float32), ("ninf", -1e4, np.float32),
        ]
    }
    return build(
        """
        g (int64[batch, sequence] ids) => (float[batch, sequence, 32] y) {
            x = Gather(table, ids)
            seq_1 = Shape <start = 1, end = 2> (ids)
            seq = Squeeze(seq_1)
            pos = Range(zero, seq, one)
            axis = Constant <value = int64[1] {1}> ()
            rows = Unsqueeze(pos, axis)
            causal = LessOrEqual(pos, rows)
            batch_1 = Shape <start = 0, end = 1> (ids)
            batch = Squeeze(batch_1)
            batch_range = Range(zero, batch, one)
            axes = Constant <value = int64[2] {1, 2}> ()
            batch_3d = Unsqueeze(batch_range, axes)
            valid = GreaterOrEqual(batch_3d, zero)
            mask = And(valid, causal)
            bias = Where(mask, fzero, ninf)
            q = MatMul(x, wq)
            k_t = Transpose <perm = [0, 2, 1]> (q)
            scores = MatMul(q, k_t)
            masked = Add(scores, bias)
            probs = Softmax <axis = -1> (masked)
            context = MatMul(probs, x)
            rows_shape = Constant <value = int64[2] {-1, 32}> ()
            flat = Reshape(context, rows_shape)
            out = Gemm(flat, wo)
            back = Shape(x)
            y = Reshape(out, back)
        }
        """,
        header=OPSET_18,
        table=[100, 32],
        wq=[32, 32],
        wo=[32, 32],
        **scalar,
    )


def test_dynamo_style_attention_mask_is_resolved_by_a_runtime_probe():
    model = causal_attention_as_dynamo_exports_it()
    shapes = {"ids": [1, 20]}
    # Static inference and folding alone leave two weighted nodes unresolved (before the fix,
    # model_cost reported macs 33280 and unresolved ('MatMul_20', 'Gemm_23')).
    static = accounting._inferred_shapes(model, shapes, 1)
    assert accounting._unresolved_tensors(model.graph, static)
    cost = model_cost(model, shapes)
    assert cost.unresolved == ()
    macs = {n.name: n.macs for n in cost.nodes if n.macs}
    assert macs == {
        "MatMul_15": 1 * 20 * 32 * 32,  # q = x @ wq: B * S * N * K
        "MatMul_17": 1 * 20 * 20 * 32,  # q @ k^T: B * S * S * D
        "MatMul_20": 1 * 20 * 32 * 20,  # probs @ x: B * S * D * S
        "Gemm_23": 20 * 32 * 32,  # [B * S, 32] @ wo: M * N * K
    }
    # The probed dims follow input_shapes / default_dim like the inferred ones.
    assert model_cost(model).macs == 32 * 32 + 32 + 32 + 32 * 32
    assert model_cost(model, {"ids": [2, 5]}).unresolved == ()


@pytest.mark.parametrize(
    ("input_shapes", "message"),
    [
        ({"image": [1, 3, 8, 8]}, "not a graph input"),
        ({"x": [1, 3, 8]}, "rank 3"),
        ({"x": [1, 3, 0, 8]}, "below 1"),
    ],
)
def test_bad_input_shapes_are_usage_errors(input_shapes, message):
    model = build("g (float[N, 3, H, W] x) => (float[N, 3, H, W] y) { y = Relu(x) }")
    with pytest.raises(UsageError, match=message):
        model_cost(model, input_shapes)


def test_default_dim_below_1_is_a_usage_error():
    model = build("g (float[N, 3] x) => (float[N, 3] y) { y = Relu(x) }")
    with pytest.raises(UsageError, match="default_dim"):
        model_cost(model, default_dim=0)


def test_the_callers_model_is_not_modified():
    model = build(
        """
        g (float[N, 3, H, W] x) => (float[N, 8, H, W] y) {
            h = Conv <pads = [1, 1, 1, 1]> (x, w)
            y = Relu(h)
        }
        """,
        w=[8, 3, 3, 3],
    )
    model = onnx.shape_inference.infer_shapes(model)
    before = model.SerializeToString()
    value_info_count = len(model.graph.value_info)
    assert model_cost(model, {"x": [2, 3, 16, 16]}).macs == 2 * 8 * 16 * 16 * 3 * 3 * 3
    assert len(model.graph.value_info) == value_info_count == 1
    assert model.SerializeToString() == before


@pytest.mark.parametrize(
    ("count", "text"),
    [
        (0, "0"),
        (999, "999"),
        (1_200, "1.2 K"),
        (25_600_000, "25.6 M"),
        (4_089_184_256, "4.09 G"),
        (999_950, "1 M"),
        (11_689_512, "11.7 M"),
    ],
)
def test_format_count(count, text):
    assert format_count(count) == text


# --- real models --------------------------------------------------------------------------


def exported_resnet(name: str):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    module = getattr(torchvision.models, name)(weights=None).eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, torch.randn(1, 3, 224, 224), buffer, dynamo=False, opset_version=17
        )
    return module, onnx.load_from_string(buffer.getvalue())


@pytest.mark.parametrize(("name", "published_macs"), [("resnet18", 1.814e9), ("resnet50", 4.089e9)])
def test_torchvision_resnet(name, published_macs):
    torch = pytest.importorskip("torch")
    module, model = exported_resnet(name)
    cost = model_cost(model)

    assert cost.unresolved == ()
    assert abs(cost.macs - published_macs) / published_macs < 0.01
    # Exact: every Conv and Linear layer's MACs, measured on the torch module.
    layer_macs = []

    def record(layer, inputs, output):
        if isinstance(layer, torch.nn.Conv2d):
            kernel = layer.kernel_size[0] * layer.kernel_size[1]
            layer_macs.append(output.numel() * layer.in_channels // layer.groups * kernel)
        elif isinstance(layer, torch.nn.Linear):
            layer_macs.append(output.numel() * layer.in_features)

    hooks = [layer.register_forward_hook(record) for layer in module.modules()]
    with torch.no_grad():
        module(torch.zeros(1, 3, 224, 224))
    for hook in hooks:
        hook.remove()
    assert cost.macs == sum(layer_macs)

    # The exporter folds each BatchNorm into its Conv, which gains a bias of C_out elements.
    convs = [m for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    expected_params = sum(c.weight.numel() + c.out_channels for c in convs)
    expected_params += module.fc.weight.numel() + module.fc.bias.numel()
    assert cost.params == expected_params


# --- the zoo: every weighted node resolved (issue 17) ---------------------------------------

zoo = load_tool("zoo")
WEIGHTED = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "Einsum", "Attention"})
DYNAMO_TRANSFORMERS = ["bert_tiny@dynamo", "gpt2_tiny@dynamo"]


def zoo_cost(name: str) -> tuple[onnx.ModelProto, ModelCost]:
    """The zoo model's cost at the channel analysis's input dims (batch 1, others 32)."""
    model = load_model(zoo.build(name))
    return model, model_cost(model, concrete_input_shapes(model))


@pytest.mark.zoo
@pytest.mark.parametrize("name", [*zoo.light_names(), *DYNAMO_TRANSFORMERS])
def test_every_weighted_node_of_the_zoo_is_resolved(name):
    model, cost = zoo_cost(name)
    assert cost.unresolved == ()
    weighted = [n for n in cost.nodes if n.op_type in WEIGHTED]
    assert weighted
    assert [n.name for n in weighted if n.macs <= 0] == []


@pytest.mark.zoo
@pytest.mark.parametrize("name", ["resnet18@dynamo", *DYNAMO_TRANSFORMERS])
def test_dynamo_export_costs_what_the_legacy_export_costs(name):
    # Same architecture: the two exporters' graphs do the same contractions. (Parameters may
    # differ by a few float scalar constants, which the exporters write differently.)
    _, dynamo = zoo_cost(name)
    _, legacy = zoo_cost(name.removesuffix("@dynamo"))
    assert dynamo.macs == legacy.macs > 0
