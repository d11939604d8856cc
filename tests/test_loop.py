"""The shared training loop's order of actions: a checkpoint is saved before the evaluation of its
step (a failing evaluation never costs it), periodic actions see whole spans, and a non-finite
step stops the loop before anything is saved."""

import numpy as np
import pytest

from pkm_jax import checkpoint as ckpt_lib
from pkm_jax import data as data_lib
from pkm_jax import program as program_lib
from pkm_jax import trainer
from pkm_jax.loop import Periodic, train_loop
from pkm_jax.writer import MetricWriter
from test_trainer import tiny_config


@pytest.fixture(scope="module")
def setup():
  config = tiny_config(**{"train.steps": 4, "mesh.data": 1, "mesh.model": 1})
  tokenizer = data_lib.build_tokenizer(config.data, None)
  program = trainer.build_train_program(config, tokenizer.get_vocab_size())
  train_iter, _ = data_lib.make_mlm_data(config.data, tokenizer, seed=0)
  return config, program, train_iter


def test_save_comes_before_a_failing_evaluation(setup, tmp_path):
  config, program, train_iter = setup
  manager = ckpt_lib.make_manager(str(tmp_path))
  calls = []

  def save(step, state):
    calls.append(("save", step))
    ckpt_lib.save_state(manager, step, state, {"step": step})

  def evaluate(step, state):
    calls.append(("eval", step))
    raise ValueError("the held-out split is empty")

  def stats(step, state):
    calls.append(("stats", step))

  with MetricWriter(str(tmp_path / "tb"), stdout=False) as writer, pytest.raises(ValueError):
    train_loop(program, program_lib.init_state(program), iter(train_iter), start_step=0,
               total_steps=4, writer=writer, log_every=1, save=Periodic(2, save),
               latest_saved=manager.latest_step, evaluate=Periodic(2, evaluate),
               periodic=(Periodic(3, stats, at_end=False),))
  manager.wait_until_finished()
  assert calls == [("save", 2), ("eval", 2)]
  assert manager.all_steps() == [2]


def test_periodic_actions_and_the_last_step(setup, tmp_path):
  config, program, train_iter = setup
  calls = []
  with MetricWriter(str(tmp_path / "tb"), stdout=False) as writer:
    train_loop(program, program_lib.init_state(program), iter(train_iter), start_step=1,
               total_steps=4, writer=writer, log_every=1,
               save=Periodic(3, lambda s, _: calls.append(("save", s))),
               latest_saved=lambda: None,
               evaluate=Periodic(0, lambda s, _: calls.append(("eval", s))),
               periodic=(Periodic(2, lambda s, _: calls.append(("stats", s)), at_end=False),))
  # Steps 2..4 (resumed at 1): stats every 2 (not at the partial end), saves at 3 and the end.
  assert calls == [("stats", 2), ("save", 3), ("stats", 4), ("save", 4)]


def test_a_non_finite_step_stops_before_saving(setup, tmp_path):
  config, program, train_iter = setup
  state = program_lib.init_state(program)
  # Poison one parameter: the first step's loss is NaN.
  kernel = state.params["bert"]["embeddings"]["word_embeddings"]["embedding"]
  state.params["bert"]["embeddings"]["word_embeddings"]["embedding"] = kernel.replace(
      kernel.get_value() * np.nan)
  saved = []
  with MetricWriter(str(tmp_path / "tb"), stdout=False) as writer, \
       pytest.raises(FloatingPointError, match="diverged at step 1"):
    train_loop(program, state, iter(train_iter), start_step=0, total_steps=4, writer=writer,
               log_every=4, save=Periodic(2, lambda s, _: saved.append(s)),
               latest_saved=lambda: None)
  assert saved == []
