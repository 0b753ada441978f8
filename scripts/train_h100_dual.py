#!/usr/bin/env python3
"""Pretrain a Korean/English sLLM with DDP (run under torchrun).

    torchrun --standalone --nproc_per_node 2 scripts/train_h100_dual.py --test
    torchrun --standalone --nproc_per_node 2 scripts/train_h100_dual.py --train --batch-size 8
    python scripts/train_h100_dual.py --help

Most users start it through ./run_h100_dual.sh, which adds the environment
check, background running, PID file and log rotation. Options: --help or README.md.
"""
import sys
from pathlib import Path

# Runnable from a checkout without installation: the package sits next to scripts/.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from koen_sllm.cli import train_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_main())
