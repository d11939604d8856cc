"""BERT-base + PKM (Lample et al.): the FFN of each memory layer is replaced by memory.

Memory at layers (3, 7), the paper's "4L/8L" (0-based): 512**2 slots, 4 heads, k=32, k_dim 256, v_dim = hidden
(base_config()'s memory defaults) -> 506M parameters, as in the paper's table.
Add --config.init.pretrained=DIR for "+Init" (start from dense BERT weights).
"""

from configs import bert_base


def get_config():
  config = bert_base.get_config()
  config.memory.update(mode="replace", layers=(3, 7))
  return config
