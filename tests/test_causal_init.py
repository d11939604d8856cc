"""+Init for causal LMs through the training program (what train.py builds): a converted GPT-2 /
Llama with zero-initialised ResM values computes exactly the pretrained logits at step 0, and
transformers' within 1e-4; then train.py runs the README's +Init command."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hf_causal_fixtures as fx
from configs import causal_resm_init
from pkm_jax import plus_init, pretrained
from pkm_jax import program as program_lib
from pkm_jax import trainer

FAMILIES = {"gpt2": ("GPT2LMHeadModel", fx.gpt2_config),
            "llama": ("LlamaForCausalLM", fx.llama_config)}


@pytest.fixture(scope="module", params=list(FAMILIES))
def hf(request, tmp_path_factory):
  import transformers  # test reference only
  cls, config = FAMILIES[request.param]
  return fx.save_hf(getattr(transformers, cls), config(),
                    str(tmp_path_factory.mktemp("hf") / request.param))


def _config(path: str, zero: bool):
  config = causal_resm_init.get_config()
  config.init.pretrained = path
  config.memory.update(layers=(0, 1), n_keys=8, heads=2, k=3, k_dim=8, value_zero_init=zero)
  config.mesh.update(data=1, model=1)
  return config


@pytest.mark.parametrize("zero", [True, False])
def test_zero_resm_values_give_the_pretrained_logits_at_step_0(hf, zero):
  import torch  # test reference only
  import transformers
  src_cfg, src_params, _ = pretrained.load_pretrained(hf)
  config = plus_init.resolve_model_config(_config(hf, zero), src_cfg)
  assert config.model.family == src_cfg.family and config.model.num_layers == 2
  program = trainer.build_train_program(config, src_cfg.vocab_size, src_cfg)
  state = program_lib.init_state(program, src_params)
  model = nnx.merge(program.graphdef, state.frozen, state.params, state.model_state)
  assert model.cfg.memory_layers == (0, 1) and model.cfg.memory.query_norm == "layernorm"
  ids, mask = fx.batch()
  got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask))[0])
  dense = pretrained.build_model(src_cfg, src_params, rngs=nnx.Rngs(0))
  ref = np.asarray(dense(jnp.asarray(ids), jnp.asarray(mask))[0])
  real = mask.astype(bool)
  if not zero:  # live random values change the function: the comparison can fail
    assert np.abs(got - ref)[real].max() > 1e-3
    return
  np.testing.assert_array_equal(got[real], ref[real])
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf).eval()
  with torch.no_grad():
    want = hf_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
  np.testing.assert_allclose(got[real], want.numpy()[real], atol=1e-4)
