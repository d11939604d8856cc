"""BERT-large (340M) without memory: the dense baseline for the large memory configs.

mesh.fsdp: on more than one device, the dense weights and their Adam moments are split over all
devices (FSDP), as are the batch (sharding.DEFAULT_RULES) and, in the memory configs, the value
tables' columns: every device holds ~1/n of the model and does ~1/n of the work. On one device
it changes nothing.
"""

from configs import bert_base


def get_config():
  config = bert_base.get_config()
  config.model.update(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096)
  config.mesh.fsdp = True
  return config
