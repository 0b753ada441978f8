"""koen-sllm: pretrain small Korean/English language models with pure PyTorch."""

__version__ = "0.1.0"
