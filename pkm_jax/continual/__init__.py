"""Continued training of a pretrained model on new text without forgetting (`finetune.method`).

  methods.py         the methods' config rules: which params freeze, memory config inheritance,
                     the one-line checks, the background sample for sparse_memory's idf
  slot_selection.py  TF-IDF ranking of memory slots (Lin et al. 2025) and the in-step selection
                     that drops unselected picks before the row-sparse update
  lora.py            rank-r LoRA adapters on attention and FFN projections, merged for evaluation
"""
