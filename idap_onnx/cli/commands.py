"""The subcommands: each a flag list and a short composition of ``idap_onnx.api`` calls.

A subcommand is registered once in :data:`COMMANDS`; its ``run`` imports the library only when
it runs, so ``idap-onnx --help`` and ``--version`` start fast. Every ``run`` has a Python
equivalent in ``idap_onnx.api`` (``inspect``, ``prune``, ``remove_blocks``) or
``idap_onnx.score_api.score`` that a pipeline calls directly.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from idap_onnx.cli import args as shared

_LOG = logging.getLogger("idap_onnx.cli")


@dataclass(frozen=True)
class Command:
    """One subcommand: its name, one-line summary, description with examples, flags, action."""

    name: str
    summary: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], None]


# -- inspect -----------------------------------------------------------------------------------


def _inspect_args(parser: argparse.ArgumentParser) -> None:
    shared.add_model_args(parser)
    shared.add_output_args(parser, model_output=False)


def _inspect(args: argparse.Namespace) -> None:
    from idap_onnx import api, report

    shared.check_paths(args)
    started = time.perf_counter()
    result = api.inspect(args.model, shared.input_shapes(args))
    _LOG.info("analyzed %s in %.1fs", args.model, time.perf_counter() - started)
    shared.emit_report(args, result.to_dict(), report.render_inspect(result))


# -- prune -------------------------------------------------------------------------------------


def _prune_args(parser: argparse.ArgumentParser) -> None:
    shared.add_model_args(parser)
    shared.add_output_args(parser, model_output=True)
    plan = parser.add_argument_group("pruning plan")
    plan.add_argument(
        "--ratio", metavar="R", type=float, required=True,
        help="fraction of all prunable channel units to remove, in [0, 1) (required)",
    )
    plan.add_argument(
        "--score", choices=("l1", "l2", "random"), default="l1",
        help="unit score: mean |w| (l1) or RMS (l2) of the unit's producer weights, or seeded "
             "random; lowest scores go first (default: l1)",
    )
    plan.add_argument(
        "--round-to", metavar="N", type=int, default=1,
        help="round each group's kept unit count to a multiple of N (default: 1)",
    )
    plan.add_argument(
        "--seed", metavar="S", type=int, default=0,
        help="seed of the random score and of the verification inputs (default: 0)",
    )
    plan.add_argument(
        "--ignore", metavar="NODE", nargs="+", action="extend", default=[],
        help="leave whole every group that these nodes produce or consume; node names as "
             "`idap-onnx inspect` prints them (default: none)",
    )
    plan.add_argument(
        "--max-group-ratio", metavar="X", type=float, default=1.0,
        help="remove at most this fraction of any one group, in (0, 1] (default: 1.0)",
    )
    _add_verify_arg(parser)


def _add_verify_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-verify", dest="verify", action="store_false",
        help="skip running both models in ONNX Runtime on random inputs to measure the "
             "largest relative output error (default: verify)",
    )


def _prune(args: argparse.Namespace) -> None:
    from idap_onnx import api, report
    from idap_onnx.model_io import save_model

    shared.check_paths(args)
    started = time.perf_counter()
    model, result = api.prune(
        args.model, args.ratio, score=args.score, round_to=args.round_to, seed=args.seed,
        ignore=tuple(args.ignore), max_group_ratio=args.max_group_ratio,
        input_shapes=shared.input_shapes(args), verify=args.verify,
    )
    _LOG.info("pruned %s in %.1fs", args.model, time.perf_counter() - started)
    written = save_model(model, args.output, input_path=args.model)
    result = replace(result, output=str(written))
    shared.emit_report(args, result.to_dict(), report.render_prune(result))


# -- remove-blocks -----------------------------------------------------------------------------


def _remove_blocks_args(parser: argparse.ArgumentParser) -> None:
    shared.add_model_args(parser)
    shared.add_output_args(parser, model_output=True)
    parser.add_argument(
        "--blocks", metavar="NAME", nargs="+", action="extend", required=True,
        help="blocks to delete, named as `idap-onnx inspect` lists them ('res:<Add node>' for "
             "a residual branch, 'chain:<first node>' for a shape-preserving chain); they must "
             "not overlap (required)",
    )
    _add_verify_arg(parser)


def _remove_blocks(args: argparse.Namespace) -> None:
    from idap_onnx import api, report
    from idap_onnx.model_io import save_model

    shared.check_paths(args)
    model, result = api.remove_blocks(
        args.model, args.blocks, input_shapes=shared.input_shapes(args), verify=args.verify,
    )
    written = save_model(model, args.output, input_path=args.model)
    result = replace(result, output=str(written))
    shared.emit_report(args, result.to_dict(), report.render_blocks(result))


# -- score -------------------------------------------------------------------------------------


#: ``calib.scores.UNIT_SCORES`` and ``score_api.DEVICES``, spelled out so that building the
#: parser imports no library (tests/test_score.py checks they agree).
SCORE_CHOICES = ("idap", "paper", "wanda", "l1", "l2", "random")
DEVICE_CHOICES = ("auto", "cpu", "cuda")


def _score_args(parser: argparse.ArgumentParser) -> None:
    shared.add_model_args(parser)
    shared.add_output_args(parser, model_output=False)
    shared.add_calib_args(parser, batch_size=8, val_fraction=0.0)
    group = parser.add_argument_group("scores")
    group.add_argument(
        "--score", choices=SCORE_CHOICES, default="idap",
        help="unit score: IDAP++ flow divergence D_f (idap), the released code's score "
             "(paper), Wanda (wanda), weight norms (l1, l2) or seeded random; blocks are "
             "always ranked by D_l (default: idap)",
    )
    group.add_argument(
        "--no-mean-compensation", dest="mean_compensation", action="store_false",
        help="idap counts each channel's full second moment instead of its variance alone "
             "(default: mean compensation on)",
    )
    group.add_argument(
        "--top", metavar="K", type=int, default=10,
        help="print the K least and K most important units (default: 10); --json always "
             "holds every score",
    )
    group.add_argument(
        "--device", choices=DEVICE_CHOICES, default="auto",
        help="ONNX Runtime device: auto takes CUDA when available (default: auto)",
    )
    group.add_argument(
        "--no-progress", dest="progress", action="store_false",
        help="no progress bar while calibrating (default: a bar on stderr when it is a "
             "terminal)",
    )


def _score(args: argparse.Namespace) -> None:
    import sys
    import warnings

    from idap_onnx import report, score_api

    shared.check_paths(args)
    if args.top < 0:
        from idap_onnx.errors import UsageError

        raise UsageError(f"--top {args.top} must be >= 0")
    with warnings.catch_warnings(record=True) as caught:  # each as one logged line
        warnings.simplefilter("always", UserWarning)
        result = score_api.score(
            args.model, args.calib, score=args.score, mean_compensation=args.mean_compensation,
            val_fraction=args.val_fraction, batch_size=args.batch_size, device=args.device,
            input_shapes=shared.input_shapes(args), image=shared.image_spec(args),
            tokenizer=args.tokenizer, seq_len=args.seq_len, num_random=args.num_random,
            seed=args.seed, progress=args.progress and sys.stderr.isatty(),
        )
    for warning in caught:
        _LOG.warning("%s", warning.message)
    _LOG.info("scored %s in %.1fs", args.model, result.timing.total_s)
    shared.emit_report(args, result.to_dict(top=args.top), report.render_score(result, args.top))


COMMANDS: tuple[Command, ...] = (
    Command(
        "inspect",
        "show costs, channel groups, frozen groups, declined nodes and removable blocks",
        "Analyze a model without changing it: op histogram, parameters, MACs and FLOPs, every\n"
        "channel group (units, prunable units, exactness, MACs, producer and consumer nodes),\n"
        "why groups are frozen, which nodes have no rule, and the removable blocks.\n\n"
        "examples:\n"
        "  idap-onnx inspect resnet50.onnx\n"
        "  idap-onnx inspect bert.onnx --input-shape input_ids:1x128 "
        "--input-shape attention_mask:1x128\n"
        "  idap-onnx inspect resnet50.onnx --json - | jq '.groups[0]'",
        _inspect_args,
        _inspect,
    ),
    Command(
        "prune",
        "remove the lowest-scored channel units of the whole model",
        "Rank the prunable channel units of all groups by their weight score, remove the lowest\n"
        "--ratio of them, check the result in ONNX Runtime on random inputs and write it.\n\n"
        "examples:\n"
        "  idap-onnx prune resnet50.onnx -o resnet50.pruned.onnx --ratio 0.3\n"
        "  idap-onnx prune resnet50.onnx -o out.onnx --ratio 0.5 --score l2 --round-to 8 \\\n"
        "      --ignore /fc/Gemm --max-group-ratio 0.8 --json report.json",
        _prune_args,
        _prune,
    ),
    Command(
        "remove-blocks",
        "delete residual branches or shape-preserving chains by name",
        "Delete the named blocks (see `idap-onnx inspect`): a residual block y = x + f(x)\n"
        "becomes y = x, a chain becomes identity. Graph inputs and outputs keep their names.\n\n"
        "examples:\n"
        "  idap-onnx remove-blocks resnet18.onnx -o out.onnx --blocks res:/layer1/layer1.1/Add\n"
        "  idap-onnx remove-blocks vit.onnx -o out.onnx --blocks res:/blocks.11/Add "
        "res:/blocks.11/Add_1 --json report.json",
        _remove_blocks_args,
        _remove_blocks,
    ),
    Command(
        "score",
        "score every channel unit and removable block on calibration data (IDAP++)",
        "Run the model once over the calibration data with in-graph statistics (ONNX Runtime)\n"
        "and score every channel unit (flow divergence D_f, or a baseline score) and every\n"
        "removable block (layer divergence D_l). Prints the provider that ran, the least and\n"
        "most important units and all blocks ranked by D_l; --json holds every score.\n"
        "Nothing is modified.\n\n"
        "examples:\n"
        "  idap-onnx score resnet50.onnx --calib imagenet_sample/ --val-fraction 0.1\n"
        "  idap-onnx score bert.onnx --calib sentences.txt --tokenizer bert-tok/ --seq-len 128\n"
        "  idap-onnx score model.onnx --calib calib.npz --score wanda --top 20 --json scores.json",
        _score_args,
        _score,
    ),
)


def _module(name: str) -> tuple[Callable, Callable]:
    """``add_arguments`` and ``run`` of the command module ``idap_onnx.cli.<name>``, imported
    when first called."""

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        importlib.import_module(f"idap_onnx.cli.{name}").add_arguments(parser)

    def run(args: argparse.Namespace) -> None:
        importlib.import_module(f"idap_onnx.cli.{name}").run(args)

    return add_arguments, run


COMMANDS = (
    COMMANDS[0],
    Command(
        "optimize",
        "the two-stage IDAP++ pipeline under an accuracy budget (the main job)",
        "Stage 1 removes channel units by flow divergence on a non-linear schedule, each step\n"
        "checked on the validation part against the original and undone when it breaks the\n"
        "budget; stage 2 removes blocks by ascending layer divergence. Writes the smallest\n"
        "model found inside the budget, OUT.report.json, OUT.report.md and PNG plots.\n\n"
        "With MODEL alone (model.onnx) it writes model.opt.onnx and its report beside it,\n"
        "calibrating on inputs generated from the model's input specs and budgeting the\n"
        "relative output error (--max-error 0.05); one warning says so. Pass real data\n"
        "(--calib DATA, --labels FILE --max-drop D) for a real result.\n\n"
        "examples:\n"
        "  idap-onnx optimize model.onnx\n"
        "  idap-onnx optimize cnn.onnx --calib train.npz --labels labels.npy --max-drop 1 \\\n"
        "      --target-flops 0.5 -o cnn.opt.onnx\n"
        "  idap-onnx optimize encoder.onnx --calib sentences.npz --metric cosine "
        "--max-drop 2 -o enc.opt.onnx\n"
        "  idap-onnx optimize cnn.onnx --calib train.npz --labels labels.npy --dry-run "
        "--json sensitivity.json\n"
        "  idap-onnx optimize cnn.onnx --config idap.toml -o out.onnx --calib train.npz",
        *_module("optimize_cmd"),
    ),
    *COMMANDS[1:],
)


COMMANDS = (
    *COMMANDS,
    Command(
        "finetune",
        "recover accuracy of a pruned model by distillation from the original",
        "Run the pruned MODEL as a torch module and train its weights to match the original\n"
        "(--teacher): KL on logits at temperature --tau (+ cross entropy with --labels), MSE on\n"
        "other outputs, AdamW with a cosine schedule; the best epoch on the validation part is\n"
        "kept. The trained weights go back into the same graph (only initializer values\n"
        "change), checked in ONNX Runtime against torch, and OUT is written atomically.\n\n"
        "examples:\n"
        "  idap-onnx finetune cnn.opt.onnx --teacher cnn.onnx --data train.npz -o cnn.ft.onnx\n"
        "  idap-onnx finetune cnn.opt.onnx --teacher cnn.onnx --data train.npz \\\n"
        "      --labels labels.npy --epochs 10 --lr 5e-4 -o cnn.ft.onnx",
        *_module("finetune_cmd"),
    ),
)


COMMANDS = (
    *COMMANDS,
    Command(
        "latency",
        "time a model and the models it is compared with, side by side",
        "Time MODEL and each --compare model in turns on the same input samples (ONNX Runtime\n"
        "with its default optimizations, or TensorRT engines on the GPU) and report each\n"
        "median and its speed-up over MODEL. Figures are this machine's, now: compare the\n"
        "ratios of one run, not figures of different runs.\n\n"
        "examples:\n"
        "  idap-onnx latency resnet50.onnx --compare resnet50.opt.onnx\n"
        "  idap-onnx latency cnn.onnx --compare cnn.opt.onnx --data calib.npz --batch 8 "
        "--json lat.json\n"
        "  idap-onnx latency bert.onnx --compare bert.opt.onnx --backend tensorrt --fp16",
        *_module("latency_cmd"),
    ),
)


COMMANDS = (
    *COMMANDS,
    Command(
        "export",
        "write a model at fp32, fp16 or int8 for its runtime (and a TensorRT engine)",
        "Convert MODEL to --precision for the --target runtime, check it against MODEL on the\n"
        "calibration samples (max relative output error), time both side by side and write\n"
        "OUT atomically. int8 is ONNX Runtime's static quantization in the target's form\n"
        "(onnxruntime-cpu: U8S8, QOperator or QDQ, whichever measures faster; tensorrt: QDQ,\n"
        "symmetric signed int8); op classes whose int8 form measures slower stay fp32, and when\n"
        "no int8 form runs faster than MODEL the fp32 model is written and the text says so.\n"
        "--engine also builds a TensorRT engine (needs TensorRT and a GPU, checked first).\n\n"
        "examples:\n"
        "  idap-onnx export cnn.opt.onnx -o cnn.int8.onnx --precision int8 --calib train.npz\n"
        "  idap-onnx export cnn.opt.onnx -o cnn.int8.onnx --precision int8 --calib train.npz \\\n"
        "      --latency-batch 8 --keep-fp32 /stem/Conv --calib-method entropy --json exp.json\n"
        "  idap-onnx export enc.onnx -o enc.fp16.onnx --precision fp16 --calib sentences.npz\n"
        "  idap-onnx export r50.onnx -o r50.int8.onnx --precision int8 --calib imgs/ \\\n"
        "      --engine r50.plan --min-shape input:1x3x224x224 --opt-shape input:8x3x224x224 \\\n"
        "      --max-shape input:32x3x224x224",
        *_module("export_cmd"),
    ),
)
