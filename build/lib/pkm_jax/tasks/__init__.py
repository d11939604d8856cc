"""Downstream tasks: GLUE and SQuAD v1.1 data (glue.py, squad.py) and their metrics (metrics.py)."""
