"""BERT-large + PKM (Lample et al.): the FFN of each memory layer is replaced by memory.

Memory at layers (11, 19), the middle and upper third (not published for large): 512**2 slots, 4 heads, k=32, k_dim 256, v_dim = hidden
(base_config()'s memory defaults) -> 860M parameters, as in the paper's table.
Add --config.init.pretrained=DIR for "+Init" (start from dense BERT weights).
"""

from configs import bert_large


def get_config():
  config = bert_large.get_config()
  config.memory.update(mode="replace", layers=(11, 19))
  return config
