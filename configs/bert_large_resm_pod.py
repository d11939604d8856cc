"""BERT-large + ResM pretraining on a TPU pod slice or several GPU hosts.

The model is configs/bert_large_resm.py's (875M parameters, two 512**2 x 1024 value tables at
layers 11 and 19); what changes is how it is laid out and run:
- mesh: every device takes 1/n of the batch (the batch is split over both mesh axes,
  sharding.DEFAULT_RULES) and holds 1/n of the model. The value tables are split by columns
  (mesh.table_split='columns', the default): over 'model' and, with mesh.fsdp (from
  bert_large.py), over 'data' too, so no device holds a data-parallel copy. A lookup
  all-gathers the picks, each device sums its columns for all of them, and an all-to-all
  returns [tokens, V/n] slices. Every dense weight and its Adam moments are split over all
  devices as well (FSDP). benchmarks/pod_plan.py compiles this step for 8-64 devices and for
  TPU topologies and prints what each device computes, holds and sends.
  --config.mesh.table_split=rows splits the rows instead (each device reduce-scatters
  [tokens, V] partial sums: n times the traffic of the columns' all-to-all).
- bfloat16 compute; parameters, optimizer state and the product-key search stay float32.
- values trained by dense Adam (XLM's): this batch makes 1024 * 128 * 4 * 32 = 16.8M picks per
  step, 64 per slot, so a step touches nearly every row and sparse updates would save nothing.
  --config.optim.values_optimizer=sparse_adam pays off once picks per step << 262,144 slots
  (small batches, or much larger tables).
- global batch 1024 x 128 tokens (as many tokens as BERT's 256 x 512); each host reads its own
  share of it. --config.train.grad_accum_steps=N splits it into N sequential micro-batches if a
  step does not fit in memory; --config.model.remat=True trades compute for activation memory.

Launch: every host runs the same command; the workdir must be a filesystem all hosts share.
  TPU pod slice (jax finds the other hosts itself):
    gcloud compute tpus tpu-vm ssh $TPU --zone=$ZONE --worker=all --command="cd pkm-jax && \
      python train.py --config configs/bert_large_resm_pod.py --workdir /mnt/shared/resm_large \
      --multihost"
  GPU hosts (one process per host, driving all of its GPUs):
    python train.py --config configs/bert_large_resm_pod.py --workdir /mnt/shared/resm_large \
      --coordinator_address=$HOST0:12345 --num_processes=$NUM_HOSTS --process_id=$HOST_RANK
"""

from configs import bert_large_resm


def get_config():
  config = bert_large_resm.get_config()
  config.mesh.update(data=-1, model=8, table_split="columns", fsdp=True)
  config.model.dtype = "bfloat16"
  config.optim.values_optimizer = "adam"
  config.data.update(batch_size=1024, max_len=128)
  config.train.update(log_every=100, memory_stats_every=1000, eval_batches=50)
  return config
