"""BERT-large (340M) without memory: the dense baseline for the large memory configs."""

from configs import bert_base


def get_config():
  config = bert_base.get_config()
  config.model.update(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096)
  return config
