"""2-process gloo DDP with accumulation gives the gradients of one process on the same global batch."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "dist" / "grad_check.py"


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _run(cmd, out: Path):
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


@pytest.mark.slow
def test_ddp_accumulation_matches_single_process(tmp_path):
    two = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                str(SCRIPT), "2", "2", str(tmp_path / "ddp.pt")], tmp_path / "ddp.pt")
    accum = _run([sys.executable, str(SCRIPT), "2", "4", str(tmp_path / "accum.pt")], tmp_path / "accum.pt")
    whole = _run([sys.executable, str(SCRIPT), "8", "1", str(tmp_path / "whole.pt")], tmp_path / "whole.pt")
    assert two["world"] == 2 and accum["world"] == 1
    for other in (accum, whole):
        assert two["loss"] == pytest.approx(other["loss"], rel=1e-5)
        assert two["grad_norm"] == pytest.approx(other["grad_norm"], rel=1e-4)
        assert two["grads"].keys() == other["grads"].keys()
        for name, g in two["grads"].items():
            torch.testing.assert_close(g, other["grads"][name], rtol=1e-4, atol=1e-6, msg=name)
    # Gradients are not trivially equal: a different batch gives different ones.
    assert any(g.abs().sum() > 0 for g in two["grads"].values())
