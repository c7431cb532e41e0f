"""Write (or check) the JSON Schema files in schemas/json/ from the Python message types.

python -m schemas.export          # rewrite schemas/json/*.schema.json
python -m schemas.export --check  # exit 1 if a file is missing or stale
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path
from typing import Any

import msgspec
import orjson

from schemas.messages import ALL_MESSAGES, Envelope, ModelRef, Tensor, schema_name

JSON_DIR = Path(__file__).with_name("json")
DRAFT = "https://json-schema.org/draft/2020-12/schema"


def file_name(message_type: type[Envelope]) -> str:
    return schema_name(message_type).replace("/", "-v") + ".schema.json"


# Keywords first in every schema object, in this order; the others follow alphabetically.
_LEADING = ("$schema", "$id", "title", "description", "type")
# Objects whose keys are names (fields, definitions), kept in the order the types declare them.
_NAMED = ("properties", "$defs", "patternProperties", "dependentSchemas")


def normalised(node: Any) -> Any:
    """`node` with what generators format differently made canonical.

    The files must describe the contract, not the generator, so the same types give the same bytes
    on any supported msgspec and the check below can stay byte-strict. What differs between msgspec
    releases: docstrings (0.23 dedents them, earlier releases kept the source indentation), cleaned
    here as `inspect.cleandoc` cleans a docstring; the order of `anyOf` alternatives (0.18-0.22 put
    `null` first) and of an object's keywords (`minLength`/`maxLength`), neither of which means
    anything in JSON Schema, so both are sorted here.
    """
    if isinstance(node, list):
        return [normalised(item) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key in sorted(node, key=lambda k: (_LEADING.index(k) if k in _LEADING else len(_LEADING), k)):
        value = node[key]
        if key == "description" and isinstance(value, str):
            out[key] = inspect.cleandoc(value)
        elif key == "anyOf" and isinstance(value, list):
            out[key] = sorted((normalised(item) for item in value), key=_canonical)
        elif key in _NAMED and isinstance(value, dict):
            out[key] = {name: normalised(sub) for name, sub in value.items()}
        else:
            out[key] = normalised(value)
    return out


def _canonical(node: Any) -> bytes:
    return orjson.dumps(node, option=orjson.OPT_SORT_KEYS)


def schema_document(message_type: type[Any]) -> dict[str, Any]:
    """A standalone JSON Schema (draft 2020-12) for one message type, normalised (see `normalised`)."""
    (ref,), components = msgspec.json.schema_components([message_type], ref_template="#/$defs/{name}")
    name = ref["$ref"].rsplit("/", 1)[-1]
    root = components.pop(name)
    doc: dict[str, Any] = {"$schema": DRAFT, "$id": f"urn:edgefleet:schema:{name}"}
    doc.update(root)
    if components:
        doc["$defs"] = components
    result: dict[str, Any] = normalised(doc)
    return result


def rendered() -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for message_type in ALL_MESSAGES:
        out[file_name(message_type)] = orjson.dumps(schema_document(message_type), option=orjson.OPT_INDENT_2)
    for part in (Tensor, ModelRef):
        out[f"{part.__name__.lower()}.schema.json"] = orjson.dumps(schema_document(part), option=orjson.OPT_INDENT_2)
    return {name: data + b"\n" for name, data in out.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m schemas.export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--check", action="store_true", help="only check that the files are up to date")
    args = parser.parse_args(argv)
    stale = []
    for name, data in rendered().items():
        path = JSON_DIR / name
        if path.exists() and path.read_bytes() == data:
            continue
        stale.append(name)
        if not args.check:
            JSON_DIR.mkdir(exist_ok=True)
            path.write_bytes(data)
    if args.check and stale:
        print(f"stale JSON Schema files: {', '.join(stale)}; run: python -m schemas.export", file=sys.stderr)
        return 1
    print(f"{'checked' if args.check else 'wrote'} {len(rendered())} schema files in {JSON_DIR}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
