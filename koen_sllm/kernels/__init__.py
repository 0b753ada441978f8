"""Triton kernels, each beside a torch reference path in its wrapper module.

  adamw.py          MasterWeightAdamW's update and gradient norm (master_adamw.py)
  cross_entropy.py  the loss and the logits' gradient in one pass (losses.py)
  rope.py           RoPE on the fused q/k/v output, forward and backward (rotary.py)
  flash_attn4.py    FlashAttention-4's CuTe kernels as custom ops (attention.py, --attn fa4)

The Triton ones are imported only where a GPU runs them; tests run them in Triton's CPU
interpreter, FA4's wrapper against a reference implementation bound in its place.
"""
