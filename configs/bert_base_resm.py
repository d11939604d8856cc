"""BERT-base + ResM (Kim & Jung): memory beside the FFN, h = LN(a + FFN(a) + PKM(a)).

Memory at layers (3, 7), the paper's "4L/8L" (0-based): 512**2 slots, 4 heads, k=32, k_dim 256, v_dim = hidden
(base_config()'s memory defaults) -> 515M parameters, as in the paper's table.
Add --config.init.pretrained=DIR for "+Init" (start from dense BERT weights).
"""

from configs import bert_base


def get_config():
  config = bert_base.get_config()
  config.memory.update(mode="residual", layers=(3, 7))
  return config
