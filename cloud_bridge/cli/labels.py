"""`cloud-bridge samples labels import|pseudo|dataset`: labels for archived samples, and dataset versions.

`import` reads Label Studio's JSON export (cloud_bridge/samples/labels.py), `pseudo` keeps a teacher
model's confident answers as pseudo-labels (cloud_bridge/samples/pseudo.py), `dataset` freezes the
labels into a dataset version (cloud_bridge/samples/datasets.py).
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from cloud_bridge.cli.common import Commands, add_config, command, open_registry
from cloud_bridge.config import load_config
from cloud_bridge.errors import UsageError
from cloud_bridge.models.store import ModelStore
from cloud_bridge.samples.datasets import DatasetSpec, create_dataset
from cloud_bridge.samples.labels import import_labels, label_counts
from cloud_bridge.samples.pseudo import pseudo_label


def add_subparsers(ssub: Commands) -> None:
    labels = ssub.add_parser(
        "labels",
        help="import human labels, make pseudo-labels, freeze dataset versions",
        description="Labels of archived samples, per source: human (imported from Label Studio) or pseudo "
        "(a teacher model's confident answers). Both are kept apart and dataset versions record which was used.",
    )
    lsub = labels.add_subparsers(dest="labels_command", required=True)
    imp = lsub.add_parser(
        "import",
        help="import a Label Studio JSON export (Export -> JSON) of tasks written by `samples export`",
        description="Validates the whole file first: a task without our data.msg_id, a sample the archive does not "
        "hold, several choices, or a label the model does not know rejects it and nothing is imported. Importing "
        "the same file again changes nothing; a changed label replaces the old one (its revision grows).",
    )
    add_config(imp, "state_dir, [registry]")
    imp.add_argument("file", type=Path, help="the JSON file Label Studio exported")
    imp.add_argument("--from-name", default="label", help="name of the <Choices> control (default: label)")
    imp.add_argument("--labels", default=None, help="allowed labels, comma-separated (default: the sample's model's)")
    command(imp, "samples labels import", _import)
    pseudo = lsub.add_parser(
        "pseudo",
        help="label samples without a human label with a teacher model's confident answers (source pseudo)",
    )
    add_config(pseudo, "state_dir, [registry], [ota] model_store")
    pseudo.add_argument("--teacher", required=True, help="a registered model, NAME@VERSION (e.g. the cloud model)")
    pseudo.add_argument("--min-confidence", type=float, default=0.9, help="keep answers at least this sure (0.9)")
    pseudo.add_argument("--fleet", default=None, help="only this fleet")
    pseudo.add_argument("--device", action="append", default=None, help="only this device (repeatable)")
    command(pseudo, "samples labels pseudo", _pseudo)
    ds = lsub.add_parser("dataset", help="freeze the current labels into a new dataset version and print its id")
    add_config(ds, "state_dir, [registry]")
    ds.add_argument("--fleet", default=None, help="only this fleet")
    ds.add_argument("--device", action="append", default=None, help="only this device (repeatable)")
    ds.add_argument("--holdout", type=float, default=0.3, help="share of human labels kept for the gate (0.3)")
    ds.add_argument("--pseudo", action="store_true", help="add pseudo-labels to the training split")
    command(ds, "samples labels dataset", _dataset)


def _import(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    allowed = [x.strip() for x in args.labels.split(",")] if args.labels else None

    async def run() -> str:
        async with open_registry(config, create=True) as registry:
            stats = await import_labels(registry, args.file, allowed=allowed, from_name=args.from_name)
            counts = await label_counts(registry)
        return f"imported {args.file}: {stats.summary()}; labels stored: {counts}"

    print(asyncio.run(run()))
    return 0


def _model_ref(text: str) -> tuple[str, str]:
    name, _, version = text.partition("@")
    if not name or not version:
        raise UsageError(f"{text!r}: give NAME@VERSION, e.g. digits-cloud@1.0.0")
    return name, version


def _pseudo(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    name, version = _model_ref(args.teacher)

    async def run() -> str:
        async with open_registry(config, create=True) as registry:
            record = await ModelStore(config.model_store_dir, registry).get(name, version)
            stats = await pseudo_label(
                registry,
                record.path,
                f"{name}@{version}",
                min_confidence=args.min_confidence,
                fleet=args.fleet,
                devices=args.device,
            )
        return (
            f"teacher {name}@{version}: {stats.labeled} of {stats.considered} samples without a human label "
            f"pseudo-labeled, {stats.below_threshold} below {args.min_confidence}"
        )

    print(asyncio.run(run()))
    return 0


def _dataset(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if not 0.0 <= args.holdout < 1.0:
        raise UsageError(f"--holdout {args.holdout} must be in [0, 1)")
    spec = DatasetSpec(
        fleet=args.fleet, devices=tuple(args.device or ()), holdout_fraction=args.holdout, include_pseudo=args.pseudo
    )

    async def run() -> str:
        async with open_registry(config, create=True) as registry:
            return await create_dataset(registry, spec)

    print(asyncio.run(run()))
    return 0
