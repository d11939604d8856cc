"""MLM pretraining data: corpus -> WordPiece tokenizer -> packed sequences -> masked batches.

A run uses two calls:

  tokenizer = build_tokenizer(config.data, workdir)   # trains or loads; saves WORKDIR/tokenizer.json
  train_iter, eval_data = make_mlm_data(config.data, tokenizer, seed=config.seed,
                                        shard_index=jax.process_index(),
                                        shard_count=jax.process_count())
  batch = next(train_iter)            # this host's rows of the global batch
  state = train_iter.get_state()      # JSON-able; train_iter.set_state(state) resumes exactly
  for batch in eval_data(num_batches):  # fixed held-out batches (None: the whole split)
    ...
  eval_data = make_eval_data(config.data, tokenizer)  # evaluation alone (eval.py)

Batches are numpy dicts, all [B_host, max_len]: input_ids, attention_mask, token_type_ids
(int32), mlm_labels (int32, original id where a token is predicted, else 0), mlm_weights
(float32, 1 where predicted). With `causal=True` (a causal LM's run: make_mlm_data,
make_eval_data, build_tokenizer) the rows are EOS-separated documents and the batches hold
input_ids, attention_mask, segment_ids, positions, targets (int32) and target_weights (float32)
(causal.py). Modules:
  corpus.py       the embedded generated world corpus (default; no download)
  sources.py      documents from data.source: 'generated' | 'files' | 'tfds'
  tokenizer.py    WordPiece: train (streamed), load (tokenizer.json / vocab.txt / folder), save
  encoder.py      fast, exact token ids of many sentences
  packing.py      FULL-SENTENCES packing, whole-corpus and streaming
  text_stream.py  input text in blocks for streaming; the held-out documents rule
  prepare.py      `python -m pkm_jax.data.prepare`: text -> prepared folder, once, offline
  prepared.py     the prepared folder: sharded ArrayRecord rows + metadata; reading rows
  keyed_random.py random numbers and permutations as pure functions of (seed, key)
  mlm.py          BERT's 80/10/10 dynamic masking
  causal.py       causal LMs: EOS-separated documents in rows, next-token batches
  bpe.py          the byte-level BPE a causal run trains when given no tokenizer
  loader.py       the grain pipeline: shuffle, read, mask, batch, prefetch; checkpointable
  pipeline.py     config.data -> row sources -> the train iterator and the eval batches
"""

from pkm_jax.data.bpe import train_bpe_tokenizer
from pkm_jax.data.causal import CausalPacker, CLMBatcher, clm_batch, pack_causal
from pkm_jax.data.corpus import GeneratedCorpus, World, generate_corpus
from pkm_jax.data.loader import ArrayRows, MLMEvalData, MLMTrainIterator
from pkm_jax.data.mlm import MLMMasker, mask_tokens, max_masked
from pkm_jax.data.packing import RowPacker, pack_sequences
from pkm_jax.data.pipeline import make_eval_data, make_mlm_data, tokenize_documents
from pkm_jax.data.prepared import PreparedRows
from pkm_jax.data.sources import load_documents
from pkm_jax.data.tokenizer import (TOKENIZER_FILE, build_tokenizer, load_tokenizer,
                                    save_tokenizer, special_token_ids, tokenizer_fingerprint,
                                    train_tokenizer)

__all__ = [
    "GeneratedCorpus", "World", "generate_corpus", "ArrayRows", "MLMEvalData",
    "MLMTrainIterator", "MLMMasker", "mask_tokens", "max_masked", "RowPacker", "pack_sequences",
    "make_eval_data", "make_mlm_data", "tokenize_documents", "PreparedRows", "load_documents",
    "build_tokenizer", "load_tokenizer", "save_tokenizer", "special_token_ids",
    "tokenizer_fingerprint", "train_tokenizer", "TOKENIZER_FILE", "train_bpe_tokenizer",
    "CausalPacker", "CLMBatcher", "clm_batch", "pack_causal",
]
