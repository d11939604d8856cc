"""Generation (pkm_jax.generate) against transformers' `generate` on random converted models of
every causal family, the sampler against its definition, and the command line."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hf_causal_fixtures as fx
from pkm_jax import generate as gen_lib
from pkm_jax import pretrained
from pkm_jax.architecture import MemoryConfig
from pkm_jax.models.registry import build_lm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEW = 24  # tokens generated: the issue asks for 20+

FAMILIES = {
    "gpt2": ("GPT2LMHeadModel", lambda: fx.gpt2_config(n_positions=64)),
    "llama": ("LlamaForCausalLM", fx.llama_config),
    "qwen2": ("Qwen2ForCausalLM", fx.qwen2_config),
    "mistral": ("MistralForCausalLM", fx.mistral_config),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  import transformers  # test reference only
  root = tmp_path_factory.mktemp("hf_generate")
  out = {}
  for i, (name, (cls, config)) in enumerate(FAMILIES.items()):
    out[name] = fx.save_hf(getattr(transformers, cls), config(), str(root / name), seed=i)
  return out


def _hf_greedy(folder: str, prompts: list[list[int]], eos: int | None) -> list[list[int]]:
  import torch  # test reference only
  import transformers
  model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
  model.generation_config.eos_token_id = eos
  model.generation_config.pad_token_id = 0
  out = []
  for prompt in prompts:
    with torch.no_grad():
      ids = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                                                             dtype=torch.long),
                           max_new_tokens=NEW, do_sample=False)
    out.append(ids[0, len(prompt):].tolist())
  return out


PROMPTS = [[5, 77, 140, 9], [200, 3, 3, 61, 18, 250, 7]]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_greedy_equals_transformers(folders, name):
  cfg, params, _ = pretrained.load_pretrained(folders[name])
  model = pretrained.build_model(cfg, params, rngs=nnx.Rngs(0))
  want = _hf_greedy(folders[name], PROMPTS, eos=None)
  # The prompts together (left-padded into one batch) and each alone give the same tokens.
  together = gen_lib.generate(model, PROMPTS, max_new_tokens=NEW)
  alone = [gen_lib.generate(model, [p], max_new_tokens=NEW)[0] for p in PROMPTS]
  assert [g.token_ids for g in together] == want
  assert [g.token_ids for g in alone] == want
  # Stopping: with the 6th greedy token as EOS, generation ends right after it.
  eos = want[0][5]
  (stopped,) = gen_lib.generate(model, PROMPTS[:1], max_new_tokens=NEW, eos_id=eos)
  assert stopped.token_ids == want[0][:want[0].index(eos) + 1]
  # Scores: each token's log-probability under the full (uncached) forward.
  ids = jnp.asarray([PROMPTS[0] + want[0]])
  logp = jax.nn.log_softmax(model(ids)[0][0], axis=-1)
  p = len(PROMPTS[0])
  ref = [float(logp[p - 1 + i, t]) for i, t in enumerate(want[0])]
  np.testing.assert_allclose(together[0].scores, ref, atol=2e-4)


def test_memory_model_needs_no_cache_for_its_memory():
  """A +ResM decoder (every memory kind): cached greedy = arg-max of the full forward, token by
  token (the memory reads the current token only)."""
  from pkm_jax.architecture import ModelConfig
  for kind, gate in (("pkm", "none"), ("memory_plus", "silu"), ("peer", "none")):
    mem = MemoryConfig(n_keys=8, heads=2, k=3, k_dim=8, v_dim=32, query_norm="layernorm",
                       kind=kind, gate=gate)
    cfg = ModelConfig(family="llama", vocab_size=50, hidden_size=32, num_layers=2, num_heads=4,
                      num_kv_heads=2, intermediate_size=48, max_position_embeddings=64,
                      layer_norm_eps=1e-5, memory_mode="residual", memory_layers=(1,),
                      memory=mem, tie_embeddings=False, hidden_dropout=0.0,
                      attention_dropout=0.0)
    model = build_lm(cfg, rngs=nnx.Rngs(3))
    prompt = [4, 9, 17]
    (got,) = gen_lib.generate(model, [prompt], max_new_tokens=12)
    ids = list(prompt)
    for _ in range(12):
      logits, _ = model(jnp.asarray([ids]))
      ids.append(int(jnp.argmax(logits[0, -1])))
    assert got.token_ids == ids[len(prompt):], kind


def test_sampler_follows_temperature_and_top_p():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.key(0), 20000)
  pick = jax.jit(jax.vmap(lambda k, t, p: gen_lib._pick(logits, k, t, p, False)[0],
                          in_axes=(0, None, None)))
  freq = lambda t, p: np.bincount(np.asarray(pick(keys, t, p)), minlength=4) / len(keys)
  np.testing.assert_allclose(freq(1.0, 1.0), [0.5, 0.3, 0.15, 0.05], atol=0.015)
  # T = 2: softmax(log p / 2) = sqrt(p), renormalised.
  want = np.sqrt([0.5, 0.3, 0.15, 0.05])
  np.testing.assert_allclose(freq(2.0, 1.0), want / want.sum(), atol=0.015)
  # top_p 0.7: the smallest prefix with >= 0.7 of the mass is {0.5, 0.3}.
  np.testing.assert_allclose(freq(1.0, 0.7), [0.625, 0.375, 0, 0], atol=0.015)
  assert freq(1.0, 1e-6)[0] == 1.0  # a vanishing top_p is greedy


def test_sampling_is_seeded(folders):
  cfg, params, _ = pretrained.load_pretrained(folders["llama"])
  model = pretrained.build_model(cfg, params, rngs=nnx.Rngs(0))
  run = lambda seed: gen_lib.generate(model, PROMPTS[:1], max_new_tokens=NEW, temperature=1.0,
                                      seed=seed)[0].token_ids
  assert run(1) == run(1)
  assert run(1) != run(2)


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "pkm_jax.generate", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


def test_command_line(folders, tmp_path):
  from tokenizers import Tokenizer
  folder = folders["gpt2"]
  tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
  prompt = "the cat sat on"
  ids = tok.encode(prompt).ids
  want = _hf_greedy(folder, [ids], eos=0)[0]  # GPT-2's <|endoftext|> stops it
  out = _cli("--model", folder, "--json", "--max_new_tokens", str(NEW), prompt)
  assert out.returncode == 0, out.stderr[-2000:]
  got = json.loads(out.stdout.strip().splitlines()[-1])
  assert got["prompt_ids"] == ids and got["token_ids"] == want
  assert got["text"] == tok.decode(want, skip_special_tokens=True)
  plain = _cli("--model", folder, "--max_new_tokens", str(NEW), prompt)
  assert plain.returncode == 0 and plain.stdout.rstrip("\n") == got["text"]
  # Bad input: one line, non-zero exit.
  for args, words in (((prompt,), "--model"), (("--model", str(tmp_path / "none"), prompt),
                                                "neither"),
                      (("--model", folder, "--max_new_tokens", "60", prompt), "positions")):
    bad = _cli(*args)
    assert bad.returncode != 0 and words in bad.stderr, bad.stderr[-1000:]
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
