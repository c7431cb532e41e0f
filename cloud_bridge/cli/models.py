"""`cloud-bridge models add|list|quantize`: the model store (cloud_bridge/models/store.py) and INT8
quantization (cloud_bridge/models/quantize.py) from the command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

from cloud_bridge.cli.common import Commands, add_config, command, open_registry, print_table
from cloud_bridge.config import load_config
from cloud_bridge.errors import ModelStoreError, UsageError
from cloud_bridge.models.quantize import QuantizeOptions, QuantizeResult, quantize
from cloud_bridge.models.store import ModelRecord, ModelStore

# `models quantize` refused the int8 model: its accuracy dropped more than the budget allows.
EXIT_OVER_BUDGET = 3

_QUANTIZE_DESCRIPTION = (
    "Quantize a float ONNX classifier to INT8 (ONNX Runtime static quantization), calibrated on real inputs, "
    "then run the float and the int8 model side by side on held-out data and print their size, accuracy and "
    "batch-1 latency. The int8 file keeps the float model's metadata, with its version, held-out accuracy and "
    "reference class mix measured anew. When accuracy drops by more than --max-accuracy-drop, OUT is deleted, "
    "nothing is registered and the exit code is 3."
)


def add_subparsers(sub: Commands) -> None:
    models = sub.add_parser("models", help="register, list and quantize model artifacts for OTA updates")
    msub = models.add_subparsers(dest="models_command", required=True)
    add = msub.add_parser(
        "add",
        help="validate an .onnx file, copy it into the content-addressed store and register it",
        description="Name and version default to the model's metadata_props (model_name, model_version).",
    )
    add.add_argument("path", type=Path, help="the .onnx file")
    add.add_argument("--name", default=None, help="model name (default: metadata model_name or file stem)")
    add.add_argument("--version", default=None, help="model version (default: metadata model_version)")
    add_config(add, "state_dir, [registry], [ota]")
    command(add, "models add", _add)
    lst = msub.add_parser("list", help="print the registered models as a table")
    add_config(lst, "state_dir, [registry], [ota]")
    command(lst, "models list", _list)
    _add_quantize(msub)


def _add(args: argparse.Namespace) -> int:
    async def add() -> ModelRecord:
        config = load_config(args.config)
        async with open_registry(config) as registry:
            store = ModelStore(config.model_store_dir, registry)
            return await store.add(args.path, args.name, args.version, warn=_warn)

    record = asyncio.run(add())
    print(f"added {record.name} {record.version} sha256={record.sha256} size={record.size} path={record.path}")
    return 0


def _warn(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr)


def _list(args: argparse.Namespace) -> int:
    async def records() -> list[ModelRecord]:
        config = load_config(args.config)
        async with open_registry(config, create=False) as registry:
            return await ModelStore(config.model_store_dir, registry).list()

    header = ("NAME", "VERSION", "SHA256", "SIZE", "LABELS", "INPUT", "ADDED")
    print_table(
        [
            header,
            *(
                (
                    r.name,
                    r.version,
                    r.sha256[:16],
                    str(r.size),
                    str(len(r.labels)),
                    "x".join(str(d) for d in r.input_shape),
                    time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r.added_at)),
                )
                for r in asyncio.run(records())
            ),
        ]
    )
    return 0


# ---- quantize -------------------------------------------------------------------------------------
def _add_quantize(msub: Commands) -> None:
    p = msub.add_parser(
        "quantize",
        help="INT8 static quantization calibrated on real data; refuses an accuracy drop over budget",
        description=_QUANTIZE_DESCRIPTION,
    )
    p.add_argument("path", type=Path, help="the float .onnx model to quantize")
    p.add_argument(
        "--calibration",
        required=True,
        help="'digits' (the digits training split) or a directory of .npy files of real inputs",
    )
    p.add_argument("--out", type=Path, required=True, help="where to write the int8 .onnx file")
    p.add_argument(
        "--eval",
        default="digits",
        dest="evaluation",
        help="held-out data: 'digits' (default, the demo models' test split) or an .npz with arrays x, y",
    )
    p.add_argument(
        "--max-accuracy-drop",
        type=float,
        default=0.01,
        help="largest allowed float-minus-int8 held-out accuracy (0.01 = one point); over it: exit 3",
    )
    p.add_argument(
        "--format",
        choices=["qoperator", "qdq"],
        default="qoperator",
        dest="quant_format",
        help="qoperator (default): integer kernels the CPU runs directly; qdq: QuantizeLinear/DequantizeLinear "
        "pairs, for accelerator execution providers that want them",
    )
    p.add_argument("--per-channel", action="store_true", help="per-channel weight scales (slower on CPU here)")
    p.add_argument("--register", action="store_true", help="add the int8 model to the bridge's model store")
    p.add_argument("--name", help="model name to register under (default: the file's model_name)")
    p.add_argument("--version", help="version of the int8 model (default: the float version + '+int8')")
    add_config(p, "needed with --register: state_dir, [registry], [ota]", required=False)
    command(p, "models quantize", _quantize)


def _quantize(args: argparse.Namespace) -> int:
    if not args.path.is_file():
        raise UsageError(f"{args.path} does not exist: pass the float .onnx file")
    if args.register and args.config is None:
        raise UsageError("--register needs --config: the bridge's config locates the model store and registry")
    options = QuantizeOptions(
        source=args.path,
        out=args.out,
        calibration=args.calibration,
        evaluation=args.evaluation,
        quant_format=args.quant_format,
        per_channel=args.per_channel,
        version=args.version,
    )
    result = quantize(options)
    print(format_table(result))
    print(f"calibration: {result.calibration_source}, {result.calibration_samples} samples")
    budget = float(args.max_accuracy_drop)
    if result.accuracy_drop > budget:
        args.out.unlink(missing_ok=True)
        print(
            f"REFUSED: accuracy drop {result.accuracy_drop * 100:.2f}pp exceeds the budget {budget * 100:.2f}pp; "
            f"{args.out} removed and nothing registered. Calibrate on more representative data, try "
            "--per-channel, or raise --max-accuracy-drop if the loss is acceptable.",
            file=sys.stderr,
        )
        return EXIT_OVER_BUDGET
    print(f"wrote {args.out} ({json.dumps(asdict(result.int8_model), default=str)})")
    if args.register:
        record = asyncio.run(_register(args, result))
        print(f"registered {record.name} {record.version} sha256={record.sha256}")
    return 0


async def _register(args: argparse.Namespace, result: QuantizeResult) -> ModelRecord:
    config = load_config(args.config)
    async with open_registry(config) as registry:
        store = ModelStore(config.model_store_dir, registry)
        try:
            return await store.add(args.out, name=args.name, version=result.int8_model.version)
        except ModelStoreError as exc:
            raise ModelStoreError(f"{args.out} written but not registered: {exc}") from exc


def format_table(result: QuantizeResult) -> str:
    """Float and int8 side by side: version, size, held-out accuracy, batch-1 latency p50."""
    f, q = result.float_model, result.int8_model
    header = f"{'':<14} {'float':>14} {'int8':>14} {'change':>12}"
    rows = [
        header,
        "-" * len(header),
        f"{'version':<14} {f.version:>14} {q.version:>14}",
        f"{'size':<14} {f.size_bytes:>12,} B {q.size_bytes:>12,} B {_ratio(q.size_bytes, f.size_bytes):>12}",
        f"{'accuracy':<14} {f.accuracy * 100:>13.2f}% {q.accuracy * 100:>13.2f}% "
        f"{(q.accuracy - f.accuracy) * 100:>+10.2f}pp",
        f"{'batch-1 p50':<14} {f.latency_p50_us:>11.1f} us {q.latency_p50_us:>11.1f} us "
        f"{_ratio(q.latency_p50_us, f.latency_p50_us):>12}",
    ]
    return "\n".join(rows)


def _ratio(new: float, old: float) -> str:
    return f"x{new / old:.2f}" if old > 0 and math.isfinite(new / old) else "-"
