"""transformers compatibility: the weight and config mapping (mapping.py) and clean model
directories for the Hub or other tools (export.py). Nothing here downloads anything."""
