"""Command line of the DeepGen ``.pt`` -> safetensors conversion (``convert.py`` beside it does the work).

Run it as a plain file, so it works whatever the pack's folder is called::

    python <pack folder>/modeling/deepgen/cli.py /path/to/model.pt [--out model.safetensors] [--allow-global module.Class ...]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

if __package__:  # imported as part of the pack (tests)
    from .convert import ConversionRefused, convert
else:  # run as a plain file: this folder is sys.path[0], and convert.py imports nothing from the pack
    from convert import ConversionRefused, convert

BYTES_PER_MB = 1e6


def main(argv: Sequence[str] | None = None) -> int:
    """Convert one checkpoint; the outcome is this tool's own output (stdout, or stderr and exit status 1)."""
    parser = argparse.ArgumentParser(description="Convert a DeepGen .pt checkpoint to safetensors (verified).")
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="output file (default: <checkpoint>.safetensors)")
    parser.add_argument("--allow-global", action="append", default=[], metavar="MODULE.CLASS",
                        help="a class the pickle may contain (only for files you trust)")
    args = parser.parse_args(argv)
    try:
        dst, n = convert(args.checkpoint, args.out, args.allow_global)
    except (ConversionRefused, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {dst} ({n} tensors, {dst.stat().st_size / BYTES_PER_MB:.1f} MB); round trip verified")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
