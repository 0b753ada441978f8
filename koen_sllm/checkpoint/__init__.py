"""Checkpoints on disk: ``store`` (the checkpoint directory: write, verify, read, resume
resolution) and ``atomic_io`` (fsynced writes, directory publishing, hashing).

Nothing is re-exported here on purpose: ``atomic_io`` is standard-library only and the data
pipeline uses it, so importing this package must not pull in torch through ``store``.
"""
