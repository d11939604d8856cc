"""Causal-LM data, training and evaluation: packing against a brute-force reference, the BPE
tokenizer, next-token batches, train.py / eval.py on configs/gpt2_resm.py and llama_resm.py
(falling loss, exact resume, multi-device, prepared data) and the perplexity against numpy."""

import json
import os
import random
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from pkm_jax.data import bpe, causal, pipeline, text_stream
from pkm_jax.data.corpus import generate_corpus
from pkm_jax.data.packing import BOUNDARY

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- packing, batches
def reference_rows(docs, max_len, *, eos, pad, bos=None, newline=()):
  """Brute force: one flat list of every document's tokens, cut every max_len tokens."""
  stream = []
  for doc in docs:
    sents = [s for s in doc if s]
    if not sents:
      continue
    stream += [] if bos is None else [bos]
    for i, sent in enumerate(sents):
      stream += (list(newline) if i else []) + list(sent)
    stream.append(eos)
  rows = [stream[i:i + max_len] for i in range(0, len(stream), max_len)]
  if rows and len(rows[-1]) < 2:
    rows.pop()
  return np.array([r + [pad] * (max_len - len(r)) for r in rows], np.int32).reshape(-1, max_len)


def random_docs(rng, n, vocab=(5, 50)):
  return [[[rng.randrange(*vocab) for _ in range(rng.randrange(0, 9))]
           for _ in range(rng.randrange(0, 5))] for _ in range(n)]


@pytest.mark.parametrize("bos, newline", [(None, ()), (3, (4,)), (2, (4, 4))])
def test_packing_matches_brute_force_and_any_chunking(bos, newline):
  rng = random.Random(0)
  docs = random_docs(rng, 60)
  want = reference_rows(docs, 7, eos=2, pad=1, bos=None if bos == 2 else bos, newline=newline)
  got = causal.pack_causal(docs, 7, eos_id=2, pad_id=1, bos_id=bos, newline_ids=newline)
  np.testing.assert_array_equal(got, want)
  # The stream cut into chunks anywhere (even inside a document) gives the same rows.
  lens, flat = [], []
  for doc in docs:
    for sent in doc:
      lens.append(len(sent))
      flat.extend(sent)
    lens.append(BOUNDARY)
  starts = np.concatenate([[0], np.cumsum(np.maximum(lens, 0))])
  packer = causal.CausalPacker(7, eos_id=2, pad_id=1, bos_id=bos, newline_ids=newline)
  cuts = sorted(rng.sample(range(1, len(lens)), 15))
  rows = [packer.add(np.array(lens[a:b]), np.array(flat[starts[a]:starts[b]], np.int32))
          for a, b in zip([0] + cuts, cuts + [len(lens)])]
  np.testing.assert_array_equal(np.concatenate(rows + [packer.finish()]), want)


def reference_batch(row, eos, pad):
  """One row, token by token: its documents, positions and next-token targets."""
  t = len(row)
  real = t
  if pad != eos:
    while real and row[real - 1] == pad:
      real -= 1
  else:
    run = 0
    while run < t and row[t - 1 - run] == eos:
      run += 1
    real = 0 if run == t else t - max(run - 1, 0)
  seg, pos, s, p = [], [], 1, 0
  for i in range(t):
    if i >= real:
      seg.append(0)
      pos.append(0)
      continue
    seg.append(s)
    pos.append(p)
    p += 1
    if row[i] == eos:
      s, p = s + 1, 0
  weights = [float(i + 1 < real and row[i] != eos) for i in range(t)]
  targets = [row[i + 1] if weights[i] else pad for i in range(t)]
  return {"input_ids": [row[i] if i < real else pad for i in range(t)],
          "attention_mask": [int(i < real) for i in range(t)], "segment_ids": seg,
          "positions": pos, "targets": targets, "target_weights": weights}


@pytest.mark.parametrize("pad", [1, 2])  # its own padding token, or padding with the EOS
def test_clm_batch_matches_reference(pad):
  rng = random.Random(1)
  rows = causal.pack_causal(random_docs(rng, 40), 9, eos_id=2, pad_id=pad, bos_id=3)
  rows = np.concatenate([rows, np.full((2, 9), pad, np.int32)])  # eval's all-padding rows
  got = causal.CLMBatcher(eos_id=2, pad_id=pad)(rows, np.arange(len(rows)), 0)
  assert set(got) == set(causal.CLM_BATCH_KEYS)
  for key in causal.CLM_BATCH_KEYS:
    want = np.array([reference_batch(r.tolist(), 2, pad)[key] for r in rows])
    np.testing.assert_array_equal(got[key], want, err_msg=key)
  assert got["target_weights"].dtype == np.float32 and got["targets"].dtype == np.int32
  # Every token but each document's first is a target exactly once, except where a row ends.
  assert got["target_weights"][-2:].sum() == 0 and got["attention_mask"][-2:].sum() == 0


def test_bpe_tokenizer_is_deterministic_and_encodes_documents_whole():
  corpus = generate_corpus(30, 40, 0, num_eval_docs=2)
  sentences = [s for doc in corpus.train for s in doc]
  tok = bpe.train_bpe_tokenizer(sentences, 300)
  assert tok.get_vocab_size() == 300
  assert (tok.token_to_id(bpe.EOS), tok.token_to_id(bpe.PAD)) == (0, 1)
  # A second training in a fresh process (other hash seeds) learns the same vocabulary.
  code = ("from pkm_jax.data import bpe; from pkm_jax.data.corpus import generate_corpus; "
          "c = generate_corpus(30, 40, 0, num_eval_docs=2); "
          "print(bpe.train_bpe_tokenizer([s for d in c.train for s in d], 300).to_str())")
  other = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONHASHSEED": "7"})
  assert other.returncode == 0, other.stderr[-2000:]
  assert json.loads(other.stdout) == json.loads(tok.to_str())
  # The packed ids of a document are the ids of its whole text (lines joined by newlines).
  ids = pipeline.clm_token_ids(tok)
  rows = pipeline._pack_documents(corpus.eval[:1], tok, 512, causal=True)
  whole = tok.encode("\n".join(corpus.eval[0])).ids + [ids["eos"]]
  assert rows[0, :len(whole)].tolist() == whole
  assert tok.decode(whole[:-1]) == "\n".join(corpus.eval[0])
  with pytest.raises(ValueError, match="at least 258"):
    bpe.train_bpe_tokenizer(sentences, 100)


def test_stream_packing_equals_in_memory_packing(tmp_path):
  corpus = generate_corpus(30, 40, 0, num_eval_docs=2)
  tok = bpe.train_bpe_tokenizer([s for doc in corpus.train for s in doc], 300)
  path = tmp_path / "docs.txt"
  path.write_text("\n\n".join("\n".join(doc) for doc in corpus.train) + "\n")
  streamed = pipeline.pack_stream(text_stream.file_blocks([str(path)], block_bytes=200), tok,
                                  24, causal=True)
  np.testing.assert_array_equal(
      streamed, pipeline._pack_documents(corpus.train, tok, 24, causal=True))


def test_causal_batches_do_not_depend_on_workers_hosts_or_resume():
  from configs import gpt2_resm
  cfg = gpt2_resm.get_config().data
  cfg.update(vocab_size=300, max_len=32, batch_size=8, prefetch=0)
  cfg.generated.update(num_entities=30, num_docs=60)
  corpus = generate_corpus(30, 60, 0, num_eval_docs=3)
  tok = bpe.train_bpe_tokenizer([s for doc in corpus.train for s in doc], 300)
  train, _ = pipeline.make_mlm_data(cfg, tok, seed=5, causal=True)
  want = [next(train) for _ in range(4)]
  assert set(want[0]) == set(causal.CLM_BATCH_KEYS)
  # Two worker processes (the batch stage pickled), and two hosts' halves, from step 2.
  cfg.workers = 2
  workers, _ = pipeline.make_mlm_data(cfg, tok, seed=5, causal=True)
  workers.set_state(json.loads(json.dumps({**train.get_state(), "step": 2})))
  hosts = [pipeline.make_mlm_data(cfg, tok, seed=5, causal=True, shard_index=i,
                                  shard_count=2)[0] for i in range(2)]
  for h in hosts:
    h.set_state({**train.get_state(), "step": 2})
  for step in (2, 3):
    got = next(workers)
    halves = [next(h) for h in hosts]
    for key in causal.CLM_BATCH_KEYS:
      np.testing.assert_array_equal(got[key], want[step][key])
      np.testing.assert_array_equal(np.concatenate([x[key] for x in halves]), want[step][key])
  workers.close()
  for h in hosts:
    h.close()


def test_tfds_source_packs_whole_documents(tmp_path):
  from pkm_jax.data import sources
  from pkm_jax.data.tokenizer import build_tokenizer
  from test_data import _TinyText, small_data_cfg
  _TinyText.prepare(str(tmp_path))
  cfg = small_data_cfg(source="tfds", tfds_name="pkm_tiny_text", tfds_split="train",
                       tfds_eval_split="validation", data_dir=str(tmp_path), vocab_size=300)
  tok = build_tokenizer(cfg, str(tmp_path / "run"), causal=True)
  assert tok.token_to_id(bpe.EOS) == 0
  train, evals = pipeline.make_mlm_data(cfg, tok, seed=0, causal=True)
  # Reference: each document's text (its sentences on lines) encoded whole, EOS after it, in
  # the order the split is stored in; the evaluation split is streamed (pack_stream).
  train_docs, eval_docs = sources.load_documents(cfg)
  assert sorted(eval_docs) == sorted(sources.split_sentences(t) for t in _TinyText.VALID)
  for rows, docs in ((train.sequences_NxT, train_docs), (evals.sequences_NxT, eval_docs)):
    ids = [[tok.encode("\n".join(doc)).ids] for doc in docs]
    np.testing.assert_array_equal(rows, reference_rows(ids, cfg.max_len, eos=0, pad=1))


# --------------------------------------------------------------------- training and evaluation
TINY = {
    "model.hidden_size": 32, "model.num_layers": 2, "model.num_heads": 2,
    "model.intermediate_size": 64, "model.max_position_embeddings": 32,
    "memory.layers": (1,), "memory.n_keys": 16, "memory.heads": 2, "memory.k": 4,
    "memory.k_dim": 16,
    "data.vocab_size": 400, "data.max_len": 32, "data.batch_size": 8,
    "data.generated.num_entities": 40, "data.generated.num_docs": 300,
    "optim.warmup_steps": 2,
    "train.steps": 12, "train.log_every": 4, "train.eval_every": 6,
    "train.checkpoint_every": 6, "train.keep_checkpoints": 3, "train.eval_batches": 2,
    "train.memory_stats_every": 6,
}
LLAMA = {"model.num_kv_heads": 1}  # grouped-query attention: 2 query heads share 1 KV head


def tiny_config(family="gpt2", **overrides):
  from configs import gpt2_resm, llama_resm
  config = (gpt2_resm if family == "gpt2" else llama_resm).get_config()
  extra = LLAMA if family == "llama" else {}
  for key, value in {**TINY, **extra, **overrides}.items():
    *groups, last = key.split(".")
    node = config
    for part in groups:
      node = node[part]
    node[last] = value
  return config


def flags_for(overrides: dict) -> list[str]:
  return [f"--config.{k}={v}" for k, v in overrides.items()]


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory):
  """One uninterrupted 12-step GPT-2 + ResM run (checkpoints at 6 and 12)."""
  from pkm_jax import trainer
  workdir = str(tmp_path_factory.mktemp("gpt2"))
  return workdir, trainer.train_and_evaluate(tiny_config(), workdir)


def test_run_writes_checkpoints_tokenizer_and_lm_metrics(gpt2_run):
  from pkm_jax import checkpoint as ckpt_lib
  workdir, result = gpt2_run
  assert sorted(ckpt_lib.make_manager(workdir, read_only=True).all_steps()) == [6, 12]
  _, tok, _ = ckpt_lib.restore_model(workdir)
  assert tok.get_vocab_size() == 400 and tok.token_to_id(bpe.EOS) == 0
  assert result["step"] == 12 and result["lm_perplexity"] == pytest.approx(
      np.exp(result["lm_loss"]), rel=1e-9)
  assert result["eval_tokens"] > 0 and "mlm_loss" not in result
  stats = result["memory"]["1"]
  assert 0 < stats["usage"] <= 100 and 0 <= stats["kl_uniform"] <= np.log(16**2)


SPARSE = {"optim.values_optimizer": "sparse_adam"}


@pytest.fixture(scope="module")
def sparse_llama_run(tmp_path_factory):
  """The 12-step run for Llama with sparse value updates (value probes through the decoder)."""
  from pkm_jax import trainer
  workdir = str(tmp_path_factory.mktemp("llama_sparse"))
  return workdir, trainer.train_and_evaluate(tiny_config("llama", **SPARSE), workdir)


@pytest.mark.parametrize("run, family, overrides", [("gpt2_run", "gpt2", {}),
                                                    ("sparse_llama_run", "llama", SPARSE)])
def test_resume_from_checkpoint_is_exact(request, run, family, overrides, tmp_path):
  from pkm_jax import trainer
  from test_trainer import assert_trees_equal, final_params
  ref_dir, _ = request.getfixturevalue(run)
  workdir = str(tmp_path / "resumed")
  shutil.copytree(ref_dir, workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "12"))
  trainer.train_and_evaluate(tiny_config(family, **overrides), workdir)
  assert_trees_equal(final_params(workdir), final_params(ref_dir))


def test_llama_training_lowers_loss(tmp_path):
  from pkm_jax import trainer
  workdir = str(tmp_path / "learn")
  short = {"train.eval_batches": 4, "optim.lr": 3e-3}
  first = trainer.train_and_evaluate(tiny_config("llama", **short, **{"train.steps": 1}),
                                     workdir)
  later = trainer.train_and_evaluate(tiny_config("llama", **short, **{
      "train.steps": 40, "train.eval_every": 40, "train.checkpoint_every": 40}), workdir)
  # The held-out loss starts near log(vocab = 400) ~ 6.0; 40 steps learn the token statistics.
  assert later["lm_loss"] < first["lm_loss"] - 0.5, (first["lm_loss"], later["lm_loss"])


@pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 (virtual) devices")
def test_two_by_two_mesh_equals_one_device(tmp_path):
  from pkm_jax import trainer
  from test_trainer import final_params
  short = {"train.steps": 4, "train.log_every": 4, "train.eval_every": 4,
           "train.checkpoint_every": 4, "train.memory_stats_every": 0}
  results, params = {}, {}
  for mesh in ((1, 1), (2, 2)):
    workdir = str(tmp_path / f"mesh{mesh[0]}x{mesh[1]}")
    results[mesh] = trainer.train_and_evaluate(
        tiny_config("llama", **short, **{"mesh.data": mesh[0], "mesh.model": mesh[1]}), workdir)
    params[mesh] = final_params(workdir)
  assert results[(2, 2)]["lm_loss"] == pytest.approx(results[(1, 1)]["lm_loss"], rel=1e-5)
  for a, b in zip(jax.tree.leaves(params[(2, 2)]), jax.tree.leaves(params[(1, 1)])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def independent_nll(model, rows, eos_id, pad_id):
  """(NLL sum, tokens): every document piece of every row run alone through the model (no
  packing, no segment ids, default positions; a piece is followed by filler tokens, which a
  causal model cannot see from earlier positions), numpy log-softmax of its logits."""
  real = causal.real_tokens(rows, eos_id=eos_id, pad_id=pad_id)
  pieces = []
  for row, mask in zip(rows, real):
    ids = row[mask].tolist()
    cuts = [i + 1 for i, t in enumerate(ids) if t == eos_id]
    pieces += [ids[a:b] for a, b in zip([0] + cuts, cuts + [len(ids)]) if b - a >= 2]
  batch = np.full((len(pieces), rows.shape[1]), 7, np.int32)
  for i, piece in enumerate(pieces):
    batch[i, :len(piece)] = piece
  logits = np.asarray(jax.jit(lambda x: model(x)[0])(batch), np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  total = -sum(logp[i, j, piece[j + 1]] for i, piece in enumerate(pieces)
               for j in range(len(piece) - 1))
  return total, sum(len(piece) - 1 for piece in pieces)


def _eval_cli(workdir, *flags):
  out = subprocess.run([sys.executable, os.path.join(REPO, "eval.py"), f"--workdir={workdir}",
                        *flags], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_eval_cli_perplexity_matches_numpy_on_held_out_and_test_files(gpt2_run, tmp_path):
  from pkm_jax import checkpoint as ckpt_lib
  workdir, _ = gpt2_run
  model, tok, _ = ckpt_lib.restore_model(workdir)
  ids = pipeline.clm_token_ids(tok)
  config = tiny_config()
  # The held-out split (every batch), then whole test files.
  held = _eval_cli(workdir)
  assert {"lm_loss", "lm_perplexity", "eval_tokens", "memory"} <= set(held)
  rows = pipeline.eval_rows(config.data, tok, causal=True).rows_NxT
  nll, count = independent_nll(model, rows, ids["eos"], ids["pad"])
  assert held["eval_tokens"] == count
  assert held["lm_loss"] == pytest.approx(nll / count, rel=1e-4)
  assert held["lm_perplexity"] == pytest.approx(np.exp(nll / count), rel=1e-4)
  assert set(held["memory"]["1"]) == {"usage", "top1_usage", "kl_uniform", "kl_weighted"}

  corpus = generate_corpus(20, 30, 5, num_eval_docs=0)
  test_file = tmp_path / "test.txt"
  test_file.write_text("\n\n".join("\n".join(doc) for doc in corpus.train) + "\n")
  files = _eval_cli(workdir, f"--config.data.eval_files={test_file}")
  rows = pipeline.pack_stream(text_stream.file_blocks([str(test_file)]), tok, 32, causal=True)
  nll, count = independent_nll(model, rows, ids["eos"], ids["pad"])
  # Every token of every document (its EOS included) is predicted but a document's first one
  # and the first one of each row that cuts a document.
  doc_lens = [len(tok.encode("\n".join(doc)).ids) + 1 for doc in corpus.train]
  starts = set(np.cumsum([0] + doc_lens[:-1]).tolist())
  cuts = [k * 32 for k in range(1, len(rows)) if k * 32 not in starts]
  assert count == files["eval_tokens"] == sum(doc_lens) - len(doc_lens) - len(cuts)
  assert files["lm_loss"] == pytest.approx(nll / count, rel=1e-4)


def _write_docs(path, docs):
  path.write_text("\n\n".join("\n".join(doc) for doc in docs) + "\n")
  return str(path)


def test_prepared_causal_rows_train_and_equal_in_memory_rows(tmp_path):
  from pkm_jax import trainer
  from pkm_jax.data import prepare as prepare_lib
  from pkm_jax.data import prepared as prepared_lib
  from pkm_jax.data import tokenizer as tok_lib
  corpus = generate_corpus(40, 120, 3, num_eval_docs=10)
  train_file = _write_docs(tmp_path / "train.txt", corpus.train)
  eval_file = _write_docs(tmp_path / "eval.txt", corpus.eval)
  out = str(tmp_path / "prepared")
  meta = prepare_lib.prepare(out, inputs=train_file, eval_inputs=eval_file, vocab_size=400,
                             max_len=32, causal=True, workers=2, rows_per_shard=32,
                             progress=False)
  assert meta["layout"] == "causal" and len(meta["splits"]["train"]["shards"]) > 1
  tok = tok_lib.load_tokenizer(out)
  # The rows the worker processes wrote are the rows the in-memory files source packs.
  rows = prepared_lib.PreparedRows(out, "train")
  in_memory = pipeline._pack_documents(corpus.train, tok, 32, causal=True)
  np.testing.assert_array_equal(rows.read(np.arange(len(rows))), in_memory)
  prepared = {"data.source": "prepared", "data.path": out, "train.steps": 2,
              "train.eval_batches": 0, "train.log_every": 1, "train.eval_every": 2,
              "train.checkpoint_every": 2}
  result = trainer.train_and_evaluate(tiny_config(**prepared), str(tmp_path / "run"))
  eval_rows = prepared_lib.PreparedRows(out, "eval")
  batch = causal.clm_batch(eval_rows.read(np.arange(len(eval_rows))), eos_id=0, pad_id=1)
  assert result["eval_tokens"] == batch["target_weights"].sum() and np.isfinite(
      result["lm_loss"])
  # A causal model refuses MLM rows (and the other way round), with one line.
  with pytest.raises(ValueError, match="holds causal rows but this run's model needs mlm"):
    pipeline.make_eval_data(tiny_config(**prepared).data, tok, causal=False)


@pytest.mark.parametrize("flag, message", [
    ("--config.data.vocab_size=200", "data.vocab_size=200 must be a number >= 258"),
])
def test_cli_config_errors_are_one_line(tmp_path, flag, message):
  out = subprocess.run([sys.executable, os.path.join(REPO, "train.py"),
                        "--config=configs/gpt2_resm.py", f"--workdir={tmp_path / 'bad'}",
                        "--config.train.steps=1", flag], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode != 0
  last = out.stderr.strip().splitlines()[-1]
  assert message in last and last.startswith("error:"), out.stderr[-1000:]
  assert not (tmp_path / "bad").exists()
