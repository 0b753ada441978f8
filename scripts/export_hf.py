#!/usr/bin/env python3
"""Copy a training checkpoint into a clean model directory for sharing.

    python scripts/export_hf.py --checkpoint auto --output exported/koen-0.6b --dtype bf16
    python scripts/export_hf.py --checkpoint outputs/checkpoint-5000 --output exported/koen-fp16 --dtype fp16
    python scripts/export_hf.py --checkpoint auto --output-root /data/run1/outputs --output exported/run1

The result holds config.json, model.safetensors (cast when --dtype is given) and
the tokenizer files, and no optimizer or training state; it loads with
``AutoModelForCausalLM.from_pretrained(dir)`` and ``AutoTokenizer.from_pretrained(dir)``.
``--checkpoint auto`` takes the checkpoint that ``<output-root>/latest`` names
(or, when that one is damaged, the newest valid one, with a warning). The export
is written to a temporary directory and renamed into place, so an interrupted
export never leaves a half-written model behind.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from koen_sllm.checkpoint.store import CheckpointError, resolve_resume  # noqa: E402
from koen_sllm.hf.export import export_hf  # noqa: E402
from koen_sllm.config import repo_root  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="examples:\n" + __doc__.split("\n\n")[1])
    p.add_argument("--checkpoint", required=True, help="checkpoint directory, or 'auto' for what <output-root>/latest names")
    p.add_argument("--output", required=True, help="directory to create (must not exist unless --overwrite)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="cast floating-point weights (default: keep as saved)")
    p.add_argument("--output-root", help="the training run's --output-dir, for --checkpoint auto (default: outputs/)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output directory")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.checkpoint == "auto":
            root = Path(args.output_root).expanduser().resolve() if args.output_root else repo_root() / "outputs"
            src = resolve_resume("auto", root, log=lambda msg: print(f"warning: {msg}", file=sys.stderr))
            if src is None:
                raise CheckpointError(f"no valid checkpoint under {root}; pass --checkpoint PATH or --output-root DIR")
        else:
            src = Path(args.checkpoint).expanduser()
            if not src.is_dir():
                raise CheckpointError(f"--checkpoint {args.checkpoint}: no such directory; pass a checkpoint directory or 'auto'")
        dst = export_hf(src, Path(args.output).expanduser(), args.dtype, overwrite=args.overwrite)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"exported {src} -> {dst}" + (f" ({args.dtype})" if args.dtype else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
