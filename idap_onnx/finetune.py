"""Distillation fine-tuning by round trip through PyTorch (METHOD.md section 6).

The pruned ONNX graph (the student) becomes an :class:`~idap_onnx.torch_graph.OnnxModule`
whose float initializers are trainable; the ORIGINAL unpruned model (the teacher) runs in torch
in eval mode without gradients. Loss per graph output: for logits

    tau^2 * KL(softmax(z_t / tau) || softmax(z_s / tau))  (+ ce_weight * CE(z_s, y) with labels)

else the MSE to the teacher's output; with ``feature_weight`` w > 0, plus
``w * mean_l ||h_l^s - h_l^t||^2 / ||h_l^t||^2`` over the residual sums h_l the two graphs
share with equal shapes (METHOD.md's optional feature terms at group boundaries).
``loss="auto"`` takes a 2-D ``[N, C>1]`` float output for logits unless its name says
embedding (``EMBEDDING_NAMES``) or the teacher's rows are unit vectors (a normalized
embedding: softmax over its features would be meaningless); ``"kl"`` and ``"mse"`` force one
kind for every 2-D output. AdamW with a cosine schedule; the best state on the
validation part (top-1 with validation labels, else the negative distillation loss to the
teacher) is kept, with early stopping after ``patience`` epochs without improvement.
BatchNormalization running statistics (when the graph still has BN nodes) are re-estimated on
the training data before and after training. The trained values are written back into the same
graph (only initializer values change) and the result is checked in ONNX Runtime against the
torch module. Unlabelled data is enough; test data is never seen here.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from idap_onnx.errors import SurgeryError, UnsupportedModelError, UsageError
from idap_onnx.padding import shape_groups

Sample = Mapping[str, np.ndarray]

#: Relative L2 tolerance between ONNX Runtime on the written model and the torch module.
WRITE_BACK_TOL = 1e-5
#: How 2-D outputs are distilled (``FinetuneConfig.loss``).
LOSSES = ("auto", "kl", "mse")
#: Output names that ``loss="auto"`` takes for embeddings (MSE), not logits.
EMBEDDING_NAMES = ("embed", "feature", "hidden", "pool")


@dataclass(frozen=True)
class FinetuneConfig:
    """Settings of :func:`finetune`.

    ``epochs``: passes over the data; ``steps``: optimizer steps per epoch (None: one pass over
    the data); ``ce_weight``: weight of the cross entropy to ``labels`` (when given);
    ``patience``: epochs without a better validation metric before stopping (needs ``val``);
    ``device``: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``; ``threads``: torch
    intra-op threads on CPU (1 is fastest for small convolutions); ``loss``: how 2-D outputs
    are distilled, ``auto``, ``kl`` or ``mse`` (module docstring); ``feature_weight``: weight
    of the feature term on the residual sums (0: off; module docstring).
    """

    epochs: int = 3
    steps: int | None = None
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 32
    tau: float = 2.0
    ce_weight: float = 0.5
    seed: int = 0
    patience: int = 2
    recalibrate_bn: bool = True
    device: str = "auto"
    threads: int = 1
    loss: str = "auto"
    feature_weight: float = 0.0

    def check(self) -> None:
        if self.epochs < 0:
            raise UsageError(f"finetune epochs {self.epochs} must be >= 0")
        if self.steps is not None and self.steps < 1:
            raise UsageError(f"finetune steps {self.steps} must be >= 1 or None")
        if not self.lr > 0:
            raise UsageError(f"finetune lr {self.lr} must be > 0, e.g. 1e-3")
        if self.weight_decay < 0:
            raise UsageError(f"finetune weight_decay {self.weight_decay} must be >= 0")
        if self.batch_size < 1:
            raise UsageError(f"finetune batch size {self.batch_size} must be >= 1")
        if not self.tau > 0:
            raise UsageError(f"finetune tau {self.tau} must be > 0, e.g. 2")
        if self.ce_weight < 0:
            raise UsageError(f"finetune ce_weight {self.ce_weight} must be >= 0")
        if self.patience < 1:
            raise UsageError(f"finetune patience {self.patience} must be >= 1")
        if self.feature_weight < 0:
            raise UsageError(f"finetune feature_weight {self.feature_weight} must be >= 0")
        if self.loss not in LOSSES:
            raise UsageError(f"finetune loss '{self.loss}': choose one of {', '.join(LOSSES)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise UsageError(f"finetune device {self.device!r}: choose auto, cpu or cuda")
        if self.threads < 0:
            raise UsageError(f"finetune threads {self.threads} must be >= 0 (0: torch default)")


@dataclass
class FinetuneResult:
    """The fine-tuned model (same graph as the student, new initializer values), one history
    row per epoch (``epoch``, mean training ``loss``, ``val_metric`` or None; epoch 0 is the
    student before training) and the wall time."""

    model: onnx.ModelProto
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    best_epoch: int = 0
    val_metric_name: str | None = None


def _stack(samples: Sequence[Sample], idx: Sequence[int], names: Sequence[str]):
    import torch

    return {
        n: torch.from_numpy(np.ascontiguousarray(np.stack([samples[i][n] for i in idx])))
        for n in names
    }


def _batches(groups: Sequence[np.ndarray], bs: int, rng=None) -> list[np.ndarray]:
    """Batches of at most ``bs`` indices, each from one shape group. With ``rng`` (one epoch of
    training): each group in random order and, with several groups, the batches shuffled; one
    group draws exactly one permutation. Without: in order."""
    out = []
    for g in groups:
        order = g if rng is None else g[rng.permutation(len(g))]
        out += [order[i : i + bs] for i in range(0, len(order), bs)]
    if rng is not None and len(groups) > 1:
        out = [out[i] for i in rng.permutation(len(out))]
    return out


def _is_logits(t, loss: str = "auto", name: str = "") -> bool:
    """Whether teacher output ``t`` (graph output ``name``) is distilled as logits (KL), else
    by MSE."""
    if loss == "mse" or not (t.dim() == 2 and t.shape[1] > 1 and t.is_floating_point()):
        return False
    if loss == "kl":
        return True
    if any(word in name.lower() for word in EMBEDDING_NAMES):
        return False
    norms = t.detach().float().norm(dim=1)
    return not bool(((norms - 1).abs() < 1e-3).all())


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def _distill(student_out, teacher_out, y, config: FinetuneConfig, names=()):
    """The loss summed over graph outputs (float outputs only; ``names``: theirs)."""
    import torch.nn.functional as F

    total = None
    for k, (zs, zt) in enumerate(zip(student_out, teacher_out, strict=True)):
        if not zs.is_floating_point():
            continue
        zs, zt = zs.float(), zt.float()
        if _is_logits(zt, config.loss, names[k] if k < len(names) else ""):
            tau = config.tau
            term = (
                F.kl_div(
                    F.log_softmax(zs / tau, dim=1),
                    F.log_softmax(zt / tau, dim=1),
                    reduction="batchmean",
                    log_target=True,
                )
                * tau
                * tau
            )
            if y is not None and k == 0 and config.ce_weight > 0:
                term = term + config.ce_weight * F.cross_entropy(zs, y)
        else:
            term = F.mse_loss(zs, zt)
        total = term if total is None else total + term
    if total is None:
        raise UsageError("fine-tuning needs at least one float graph output to distill")
    return total


def _bn_modules_present(module) -> bool:
    return bool(module.bn_stat_names)


def recalibrate_bn(module, samples: Sequence[Sample], batch_size: int, names, device) -> bool:
    """Re-estimates the BatchNormalization running statistics of ``module`` on ``samples``:
    reset (mean 0, var 1), then a cumulative average of the batch statistics of forward passes
    in train mode without gradients. Returns False (nothing done) when the graph has no
    BatchNormalization (e.g. folded into Conv at export)."""
    import torch

    if not _bn_modules_present(module) or not samples:
        return False
    by_onnx = {onnx_name: getattr(module, attr) for attr, onnx_name in module.bn_stat_names.items()}
    bn_nodes = [n for n in module._nodes if n.op_type == "BatchNormalization"]
    pairs = []  # (mean buffer, var buffer) per BN node
    for node in bn_nodes:
        mean, var = by_onnx.get(node.inputs[3]), by_onnx.get(node.inputs[4])
        if mean is not None and var is not None:
            pairs.append((mean, var))
    if not pairs:
        return False
    sums = [(torch.zeros_like(m), torch.zeros_like(v)) for m, v in pairs]
    was_training = module.training
    module.train()
    n_batches = 0
    with torch.no_grad():
        for idx in _batches(shape_groups(samples, names), batch_size):
            feeds = {k: v.to(device) for k, v in _stack(samples, idx, names).items()}
            for m, v in pairs:  # momentum 1: the buffers hold this batch's statistics
                m.zero_()
                v.fill_(1.0)
            saved = [node.attrs.get("momentum") for node in bn_nodes]
            for node in bn_nodes:
                node.attrs["momentum"] = 0.0  # ONNX momentum 0 == running := batch stat
            try:
                module(feeds)
            finally:
                for node, mom in zip(bn_nodes, saved, strict=True):
                    if mom is None:
                        node.attrs.pop("momentum", None)
                    else:
                        node.attrs["momentum"] = mom
            for (m, v), (sm, sv) in zip(pairs, sums, strict=True):
                sm += m
                sv += v
            n_batches += 1
        for (m, v), (sm, sv) in zip(pairs, sums, strict=True):
            m.copy_(sm / n_batches)
            v.copy_(sv / n_batches)
    module.train(was_training)
    return True


def _device(name: str):
    import torch

    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UsageError("finetune device 'cuda' requested but torch sees no CUDA device")
        return torch.device("cuda")
    return torch.device("cpu")


def _check_samples(samples, names, what: str) -> None:
    if not samples:
        raise UsageError(f"fine-tuning {what} is empty; give at least one sample")
    missing = [n for n in names if n not in samples[0]]
    if missing:
        raise UsageError(
            f"fine-tuning {what} lacks inputs {', '.join(missing)}; samples must be "
            f"{{input_name: array}} for inputs {', '.join(names)}"
        )


def finetune(
    student: onnx.ModelProto,
    teacher: onnx.ModelProto,
    data: Sequence[Sample],
    *,
    labels: np.ndarray | None = None,
    val: Sequence[Sample] | None = None,
    val_labels: np.ndarray | None = None,
    config: FinetuneConfig = FinetuneConfig(),  # noqa: B008 (frozen)
    progress: bool = False,
) -> FinetuneResult:
    """Fine-tunes ``student`` (a pruned model) by distillation from ``teacher`` (the original).

    Args:
        student: The model to train; its graph is kept, only initializer values change.
        teacher: The ORIGINAL unpruned model (same inputs and outputs).
        data: Training samples ``{input_name: array}`` without the batch dim. Their shapes may
            differ (text of different lengths, without padding): a batch stacks samples of one
            shape, and the batches of all shapes are shuffled together each epoch.
        labels: Class index per training sample (adds ``ce_weight * CE`` on output 0).
        val: Validation samples for early stopping and best-state selection (optional).
        val_labels: Class index per validation sample: the validation metric is top-1;
            otherwise it is the negative distillation loss to the teacher.
        config: :class:`FinetuneConfig`.
        progress: Show a tqdm bar with the loss and samples/s.

    Raises:
        UnsupportedModelError: The student or teacher uses an operator the torch executor
            lacks (one line listing them).
        UsageError: Bad settings or data.
        SurgeryError: ONNX Runtime on the written model disagrees with the torch module.
    """
    import torch

    from idap_onnx.torch_graph import OnnxModule, write_back

    config.check()
    t0 = time.perf_counter()
    data = list(data)
    val = list(val) if val else []
    if labels is not None:
        labels = np.asarray(labels).astype(np.int64).reshape(-1)
        if len(labels) != len(data):
            raise UsageError(
                f"{len(labels)} labels for {len(data)} training samples; give one per sample"
            )
    if val_labels is not None:
        val_labels = np.asarray(val_labels).astype(np.int64).reshape(-1)
        if len(val_labels) != len(val):
            raise UsageError(
                f"{len(val_labels)} validation labels for {len(val)} validation samples"
            )

    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            s_mod = OnnxModule(student)
            try:
                t_mod = OnnxModule(teacher)
            except UnsupportedModelError as exc:
                raise UnsupportedModelError(f"teacher: {exc}") from exc
            names = s_mod.input_names
            if list(t_mod.input_names) != list(names):
                raise UsageError(
                    f"student inputs {names} differ from teacher inputs {t_mod.input_names}; "
                    "pass the original model the student was pruned from"
                )
            _check_samples(data, names, "data")
            if val:
                _check_samples(val, names, "validation data")
            device = _device(config.device)
            s_mod.to(device)
            t_mod.to(device).eval()
            for p in t_mod.parameters():
                p.requires_grad_(False)
            if config.feature_weight > 0:
                shapes = {k: [1, *np.shape(v)] for k, v in data[0].items()}
                taps = residual_sums(student, shapes) & residual_sums(teacher, shapes)
                s_mod.tap(taps)
                t_mod.tap(taps)
            result = _train(s_mod, t_mod, data, labels, val, val_labels, config, device, progress)
            s_mod.to("cpu").eval()
            model = write_back(s_mod, student)
            _check_written(model, s_mod, data + val, names)
    finally:
        torch.set_num_threads(threads)
    result.model = model
    result.seconds = time.perf_counter() - t0
    return result


def _train(s_mod, t_mod, data, labels, val, val_labels, config, device, progress):
    import torch

    names = s_mod.input_names
    outputs = list(s_mod.output_names)
    n = len(data)
    bs = min(config.batch_size, n)
    groups = shape_groups(data, names)
    steps = config.steps or sum(math.ceil(len(g) / bs) for g in groups)
    total_steps = max(config.epochs * steps, 1)
    if config.recalibrate_bn:
        recalibrate_bn(s_mod, data, bs, names, device)

    params = [p for p in s_mod.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    rng = np.random.default_rng(config.seed)
    y_all = None if labels is None else torch.from_numpy(labels)

    metric_name = None
    if val:
        metric_name = "top1" if val_labels is not None else "neg_distill_loss"

    def teacher_out(feeds):
        with torch.no_grad():
            return _as_tuple(t_mod(feeds))

    # teacher outputs on the validation part, once
    val_batches = []
    for idx in _batches(shape_groups(val, names), bs) if val else []:
        feeds = {k: v.to(device) for k, v in _stack(val, idx, names).items()}
        y = None if val_labels is None else torch.from_numpy(val_labels[idx])
        val_batches.append((feeds, teacher_out(feeds), y))

    def validate() -> float | None:
        if not val_batches:
            return None
        s_mod.eval()
        correct, loss_sum, count = 0, 0.0, 0
        with torch.no_grad():
            for feeds, t_out, y in val_batches:
                s_out = _as_tuple(s_mod(feeds))
                k = len(next(iter(feeds.values())))
                if y is not None:
                    pred = s_out[0].argmax(dim=1).cpu()
                    correct += int((pred == y).sum())
                else:
                    loss_sum += float(_distill(s_out, t_out, None, config, outputs)) * k
                count += k
        s_mod.train()
        return correct / count if val_labels is not None else -loss_sum / count

    history = [{"epoch": 0, "loss": None, "val_metric": validate()}]
    best = history[0]["val_metric"]
    best_state = copy.deepcopy(s_mod.state_dict())
    best_epoch, stale = 0, 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, desc="finetune", unit="step", leave=False)
    s_mod.train()
    queue: list[np.ndarray] = []
    try:
        for epoch in range(1, config.epochs + 1):
            loss_sum, seen, te = 0.0, 0, time.perf_counter()
            for _ in range(steps):
                if not queue:  # a new pass over the data
                    queue = _batches(groups, bs, rng)[::-1]
                idx = queue.pop()
                feeds = {k: v.to(device) for k, v in _stack(data, idx, names).items()}
                y = None if y_all is None else y_all[idx].to(device)
                t_out = teacher_out(feeds)
                s_out = _as_tuple(s_mod(feeds))
                loss = _distill(s_out, t_out, y, config, outputs)
                if config.feature_weight > 0:
                    loss = loss + config.feature_weight * _features(s_mod.taps, t_mod.taps)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                loss_sum += float(loss.detach()) * len(idx)
                seen += len(idx)
                if bar is not None:
                    rate = seen / max(time.perf_counter() - te, 1e-9)
                    bar.set_postfix(epoch=epoch, loss=f"{loss_sum / seen:.4f}", sps=f"{rate:.0f}")
                    bar.update(1)
            metric = validate()
            history.append({"epoch": epoch, "loss": loss_sum / max(seen, 1), "val_metric": metric})
            if metric is None or best is None or metric > best:
                best, best_epoch, stale = metric, epoch, 0
                best_state = copy.deepcopy(s_mod.state_dict())
            else:
                stale += 1
                if stale >= config.patience:
                    break
    finally:
        if bar is not None:
            bar.close()
    s_mod.load_state_dict(best_state)
    if config.recalibrate_bn and best_epoch > 0:
        recalibrate_bn(s_mod, data, bs, names, device)
    return FinetuneResult(
        model=None, history=history, best_epoch=best_epoch, val_metric_name=metric_name
    )


def residual_sums(model: onnx.ModelProto, input_shapes=None) -> set[str]:
    """The outputs of the model's residual blocks (``y = x + f(x)``, ``blocks.find_blocks``):
    the flow tensors between blocks. Node outputs keep their names when idap-onnx prunes, so
    the student's and the teacher's match by name."""
    from idap_onnx.blocks import find_blocks
    from idap_onnx.dependency import analyze_model

    graph = analyze_model(model, input_shapes)
    return {b.output for b in find_blocks(graph.model, graph.index) if b.kind == "residual"}


def _features(student: dict, teacher: dict):
    """Mean over the shared taps of ``||s - t||^2 / ||t||^2`` (relative, so every layer
    counts alike); taps whose shapes differ (a pruned residual stream) are skipped."""
    terms = [
        (s.float() - t.float()).pow(2).sum() / t.float().pow(2).sum().clamp_min(1e-12)
        for k, s in student.items()
        if (t := teacher.get(k)) is not None and s.shape == t.shape
    ]
    if not terms:
        return 0.0
    return sum(terms) / len(terms)


def _check_written(model: onnx.ModelProto, module, samples, names, n: int = 8) -> None:
    """ONNX Runtime on ``model`` must match the torch module (eval) on a few samples."""
    import onnxruntime as ort
    import torch

    if not samples:
        return
    idx = shape_groups(samples, names)[0][:n]
    feeds = _stack(samples, idx, names)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    got = sess.run(None, {k: v.numpy() for k, v in feeds.items()})
    module.eval()
    with torch.no_grad():
        want = [t.detach().cpu().numpy() for t in _as_tuple(module(feeds))]
    for name, g, w in zip(module.output_names, got, want, strict=True):
        if not np.issubdtype(np.asarray(w).dtype, np.floating):
            continue
        g64, w64 = np.asarray(g, np.float64), np.asarray(w, np.float64)
        err = float(np.linalg.norm(g64 - w64) / max(np.linalg.norm(w64), 1e-12))
        if not err <= WRITE_BACK_TOL:
            raise SurgeryError(
                f"fine-tuned model output '{name}' differs between ONNX Runtime and the torch "
                f"module by {err:.2e} relative L2 (> {WRITE_BACK_TOL:g}); the torch executor "
                "disagrees with ONNX Runtime on this graph, fine-tuning cannot be written back"
            )
