"""``idap-onnx finetune``: distillation fine-tuning of a pruned model (METHOD.md section 6).

The pruned MODEL learns from the ORIGINAL (``--teacher``) on ``--data`` (labels optional);
a ``--val-fraction`` part of the data selects the best epoch. Only initializer values change.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from idap_onnx.cli import args as shared


def add_arguments(parser: argparse.ArgumentParser) -> None:
    shared.add_model_args(parser)
    shared.add_output_args(parser, model_output=True)
    data = parser.add_argument_group("teacher and data")
    data.add_argument(
        "--teacher",
        metavar="ORIGINAL",
        required=True,
        help="the original, unpruned model to distill from (required)",
    )
    data.add_argument(
        "--data",
        metavar="DATA",
        required=True,
        help="training samples, as --calib of optimize (docs/DATA.md): .npz/.npy, a folder, "
        "images, or a .txt with --tokenizer; unlabelled data is enough (required)",
    )
    data.add_argument(
        "--labels",
        metavar="FILE",
        default=None,
        help="class index per sample (.npy/.npz/.txt): adds a cross-entropy term and makes "
        "top-1 the validation metric (default: none)",
    )
    data.add_argument(
        "--val-fraction",
        metavar="F",
        type=float,
        default=0.1,
        help="fraction of the data held out to pick the best epoch and stop early; 0 "
        "trains on everything and keeps the last epoch (default: 0.1)",
    )
    data.add_argument(
        "--tokenizer",
        metavar="DIR",
        default=None,
        help="HuggingFace tokenizer folder for a .txt of sentences (default: none)",
    )
    data.add_argument(
        "--seq-len", metavar="N", type=int, default=128, help="token sequence length (128)"
    )
    train = parser.add_argument_group("training")
    train.add_argument("--epochs", metavar="N", type=int, default=3, help="epochs (3)")
    train.add_argument("--lr", metavar="X", type=float, default=1e-3, help="AdamW lr (1e-3)")
    train.add_argument(
        "--weight-decay", metavar="X", type=float, default=1e-4, help="AdamW decay (1e-4)"
    )
    train.add_argument(
        "--batch-size", metavar="N", type=int, default=32, help="samples per step (32)"
    )
    train.add_argument(
        "--tau", metavar="T", type=float, default=2.0, help="distillation temperature (2)"
    )
    train.add_argument(
        "--ce-weight",
        metavar="W",
        type=float,
        default=0.5,
        help="weight of the cross entropy with --labels (0.5)",
    )
    train.add_argument(
        "--patience", metavar="N", type=int, default=2, help="early-stop patience (2)"
    )
    train.add_argument(
        "--loss",
        choices=("auto", "kl", "mse"),
        default="auto",
        help="how 2-D outputs are distilled: kl (logits), mse, or auto: kl unless the "
        "output's name says embed/feature/hidden/pool or the original's rows are unit "
        "vectors (an embedding: mse)",
    )
    train.add_argument(
        "--feature-weight",
        metavar="W",
        type=float,
        default=0.0,
        help="weight of a feature term on the residual sums the pruned model shares with the "
        "original (relative MSE per layer; 0 = off)",
    )
    train.add_argument("--seed", metavar="S", type=int, default=0, help="seed (0)")
    train.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="torch device (default: auto)",
    )
    train.add_argument("--threads", metavar="N", type=int, default=1, help="torch CPU threads (1)")
    train.add_argument("--progress", action="store_true", help="show a progress bar on stderr")
    train.add_argument(
        "--keep-padding",
        action="store_true",
        help="train on text padded to --seq-len; by default each sentence is cut to its "
        "length (rounded up to 8) when the teacher's outputs are shown not to change",
    )


def run(args: argparse.Namespace) -> None:
    import numpy as np

    from idap_onnx.calib.data import load_data, split
    from idap_onnx.errors import UnsupportedModelError, UsageError
    from idap_onnx.finetune import FinetuneConfig, finetune
    from idap_onnx.model_io import load_model, save_model
    from idap_onnx.optimize_api import _read_labels
    from idap_onnx.padding import trim_padding
    from idap_onnx.torch_graph import unsupported_ops

    shared.check_paths(args)
    if Path(args.output).resolve() == Path(args.teacher).resolve():
        raise UsageError(f"output {args.output} is the teacher; choose another -o path")
    config = FinetuneConfig(
        epochs=args.epochs,
        lr=args.lr,
        weight_decay=args.weight_decay,
        batch_size=args.batch_size,
        tau=args.tau,
        ce_weight=args.ce_weight,
        seed=args.seed,
        patience=args.patience,
        device=args.device,
        threads=args.threads,
        loss=args.loss,
        feature_weight=args.feature_weight,
    )
    config.check()
    student = load_model(args.model)
    teacher = load_model(args.teacher)
    for role, model in (("model", student), ("teacher", teacher)):
        bad = unsupported_ops(model)
        if bad:
            raise UnsupportedModelError(
                f"{role} uses operators the torch executor cannot run: {', '.join(bad)}; "
                "fine-tuning needs every operator in torch"
            )
    ds = load_data(args.data, student, tokenizer=args.tokenizer, seq_len=args.seq_len)
    labels = _read_labels(args.labels) if args.labels else None
    if labels is not None and len(labels) != len(ds):
        raise UsageError(
            f"labels have {len(labels)} entries but the data has {len(ds)} samples; "
            "give one class index per sample, in order"
        )
    train, val = split(ds, args.val_fraction, args.seed)
    train_samples = [train[i] for i in range(len(train))]
    val_samples = [val[i] for i in range(len(val))]
    tr_labels = va_labels = None
    if labels is not None:
        tr_labels = np.asarray(labels)[train.indices]
        va_labels = np.asarray(labels)[val.indices] if len(val) else None
    if not args.keep_padding:
        train_samples, note = trim_padding(train_samples, teacher)
        if val_samples and note.startswith("padding cut"):
            val_samples, _ = trim_padding(val_samples, teacher)
        if note.startswith("padding"):
            print(note, file=sys.stderr, flush=True)
    print(
        f"fine-tuning on {len(train_samples)} samples, validating on {len(val_samples)}",
        file=sys.stderr,
        flush=True,
    )
    result = finetune(
        student,
        teacher,
        train_samples,
        labels=tr_labels,
        val=val_samples or None,
        val_labels=va_labels,
        config=config,
        progress=args.progress,
    )
    save_model(result.model, args.output, input_path=args.model)
    for row in result.history:
        loss = "-" if row["loss"] is None else f"{row['loss']:.4f}"
        metric = "-" if row["val_metric"] is None else f"{row['val_metric']:.4f}"
        print(f"epoch {row['epoch']}: loss {loss}, val {result.val_metric_name or '-'} {metric}")
    print(f"best epoch {result.best_epoch}; {result.seconds:.1f} s")
    if args.json:
        import json

        report = {
            "schema_version": 1,
            "command": "finetune",
            "history": result.history,
            "best_epoch": result.best_epoch,
            "val_metric": result.val_metric_name,
            "seconds": result.seconds,
        }
        text = json.dumps(report, indent=2)
        if args.json == shared.STDOUT:
            print(text)
        else:
            shared.write_text_atomic(Path(args.json), text)
    print(f"wrote model: {args.output}")
