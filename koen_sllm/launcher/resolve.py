"""The settings a run will use, for the launcher's banner and --dry-run (run with the run's Python).

    WORLD_SIZE=2 python -m koen_sllm.launcher.resolve --train --batch-size 8 ...

prints {"config": ..., "notes": [...]} as JSON: the options, the output
folder's recorded run and the device's defaults resolved exactly as the
trainer will resolve them (it calls the same functions). A bad or refused
option: one line on stderr, exit 2.
"""
from __future__ import annotations

import json
import os
import sys


def main(argv: list[str]) -> int:
    from ..cli import bilingual, missing_requirements, print_error, resolve_config, resolve_fully
    from ..config import ConfigError

    import torch

    world_size, has_cuda = int(os.environ.get("WORLD_SIZE", "1")), torch.cuda.is_available()
    try:
        cfg, _, explicit, notes = resolve_config(argv, world_size, has_cuda)
        notes = resolve_fully(cfg, explicit, notes, world_size, has_cuda)
    except ConfigError as exc:
        print_error(bilingual(str(exc)))
        return 2
    # A missing package or FP8 GPU stops the start, not the run minutes later.
    for exc, korean in missing_requirements(cfg):
        if not os.environ.get("KOEN_RESOLVE_DRY_RUN"):
            print_error(bilingual(str(exc), korean))
            return 2
        notes.append(f"⚠️  the run would stop here: {exc}")  # a dry run still shows the settings
    print(json.dumps({"config": cfg.to_dict(), "notes": notes, "has_cuda": has_cuda}, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
