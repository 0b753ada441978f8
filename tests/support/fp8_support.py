"""The marker the FP8 tests share: skip what needs torchao where it is not installed."""
from __future__ import annotations

import pytest

from koen_sllm import fp8


def has_torchao() -> bool:
    try:
        fp8.require_torchao()
    except fp8.Fp8Unavailable:
        return False
    return True


needs_torchao = pytest.mark.skipif(not has_torchao(), reason="torchao is not installed (pip install 'koen-sllm[fp8]')")
