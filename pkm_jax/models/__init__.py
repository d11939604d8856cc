"""The model families that carry memory layers (BERT: `bert.py`), the class each ModelConfig
builds (`registry.py`), and where every family keeps its memory tables (`tables.py`)."""
