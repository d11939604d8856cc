"""Fine-tune a pretrained model on SQuAD v1.1 and report dev EM / F1 (run with eval.py).

  python eval.py --config configs/squad.py --config.init.pretrained=WORKDIR \
      --config.data.data_dir=/data/squad
  (DATA_DIR holds train-v1.1.json and dev-v1.1.json; or --config.data.source=tfds for squad/v1.1)

Windows of 384 tokens every 128 context tokens, questions cut at 64 tokens, 20-best spans of at
most 30 tokens; AdamW lr 3e-5 for 2 epochs (google-research/bert's SQuAD 1.1 recipe, 88.5 F1
with BERT-base; it used batch 12, here 32 as for GLUE), 10% warmup then linear decay.
Every key: pkm_jax/tasks/task_config.py: base_config().
"""

from pkm_jax.tasks.task_config import base_config


def get_config():
  config = base_config()
  config.task = "squad"
  config.data.update(max_len=384, doc_stride=128, max_query_len=64, batch_size=32)
  config.eval.update(n_best=20, max_answer_len=30)
  config.optim.update(lr=3e-5, warmup_fraction=0.1)
  config.train.epochs = 2.0
  return config
