"""One optimizer step's gradients for a fixed global batch, saved for comparison.

    python -m torch.distributed.run --nproc_per_node 2 tests/dist/grad_check.py MICRO ACCUM OUT.pt
    python tests/dist/grad_check.py MICRO ACCUM OUT.pt

Runs the trainer's own train_step with a loader that hands out slices of one
fixed tensor in the same global order the real loader uses (rank r takes the
r-th micro-batch of each global slice), and captures the gradients the
optimizer would see, after DDP's all-reduce and the 1/accumulation scaling.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import torch  # noqa: E402

from koen_sllm import distributed as D  # noqa: E402
from koen_sllm.config import apply_device_defaults, parse_args  # noqa: E402
from koen_sllm.trainer import Trainer  # noqa: E402

GLOBAL_SEQS, SEQ, VOCAB = 8, 32, 512


class SliceLoader:
    def __init__(self, data, micro, rank, world):
        self.data, self.micro, self.rank, self.world = data, micro, rank, world
        self.cursor, self.num_samples, self.epoch = 0, len(data), 0.0

    def next_batch(self):
        start = self.cursor + self.rank * self.micro
        b = self.data[start:start + self.micro]
        self.cursor += self.micro * self.world
        return b[:, :-1].contiguous(), b[:, 1:].contiguous()


def step_grads(cfg, info, micro: int) -> dict:
    """One train_step's loss, grad norm and the gradients the optimizer would see."""
    data = torch.randint(0, VOCAB, (GLOBAL_SEQS, SEQ + 1), generator=torch.Generator().manual_seed(0))
    tr = Trainer(cfg, info)
    tr.build(VOCAB, SliceLoader(data, micro, info.rank, info.world_size))
    tr.finalize()
    grads = {}

    def capture(*_a, **_k):
        for name, p in tr.raw_model.named_parameters():
            grads[name] = p.grad.detach().clone()

    tr.engine.optimizer.step = capture
    loss, grad_norm, applied = tr.train_step()
    assert applied and tr.loader.cursor == GLOBAL_SEQS, (applied, tr.loader.cursor)
    return {"grads": grads, "loss": float(loss), "grad_norm": float(grad_norm), "world": info.world_size}


def main(micro: int, accum: int, out: str) -> None:
    cfg, _ = parse_args(["--train", "--model-size", "tiny", "--batch-size", str(micro), "--grad-accum", str(accum),
                         "--max-seq-length", str(SEQ), "--max-steps", "1", "--grad-clip", "0", "--no-compile",
                         "--fp32"])
    apply_device_defaults(cfg, False)
    info = D.init_distributed()
    result = step_grads(cfg, info, micro)  # the trainer is garbage once this returns; D.cleanup frees it
    if info.is_main:
        torch.save(result, out)
    D.barrier()  # tear down together, as koen_sllm.cli does
    D.cleanup()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
