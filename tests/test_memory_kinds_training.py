"""PEER -- the kind with the most moving parts: two row tables, shared by two layers, updated
row-sparsely -- through the trainer at tiny sizes: it trains, resumes exactly, reports usage per
layer of the shared tables, runs on a 2x4 mesh as on one device and fills masks from its workdir.
(Memory+ differs from PKM only inside the layer: tests/test_memory_kinds.py. The runs are
compile-bound, ~25 s each on a loaded CPU, so there are only three.)"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import shutil  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from pkm_jax import fill_mask, trainer  # noqa: E402
from test_sharded_training import assert_params_close  # noqa: E402
from test_trainer import assert_trees_equal, final_params, tiny_config  # noqa: E402

SHORT = {"train.steps": 4, "train.log_every": 2, "train.eval_every": 4,
         "train.checkpoint_every": 2, "train.memory_stats_every": 4, "memory.layers": (0, 1),
         "memory.share_values": True, "optim.values_optimizer": "sparse_adam",
         # Deterministic, so that the 2x4 mesh must reproduce the one-device run.
         "memory.query_norm": "layernorm", "model.hidden_dropout": 0.0,
         "model.attention_dropout": 0.0}
PEER = {"memory.kind": "peer", **SHORT}


@pytest.fixture(scope="module")
def peer_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("peer"))
  return workdir, trainer.train_and_evaluate(tiny_config(**PEER), workdir)


def test_peer_trains_resumes_and_fills_masks(peer_run, tmp_path):
  ref_dir, result = peer_run
  assert np.isfinite(result["mlm_loss"])
  # Usage is per layer although both layers read one table.
  assert set(result["memory"]) == {"0", "1"}
  assert all(0 < s["usage"] <= 100 for s in result["memory"].values())
  workdir = str(tmp_path / "resumed")
  shutil.copytree(ref_dir, workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))
  trainer.train_and_evaluate(tiny_config(**PEER), workdir)
  assert_trees_equal(final_params(workdir), final_params(ref_dir))
  model, tokenizer = fill_mask.load_model(ref_dir)
  assert len(fill_mask.fill_mask(model, tokenizer, "the [MASK] is", 3)[0]) == 3


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (virtual) devices")
def test_peer_sharded_training_matches_one_device(peer_run, tmp_path):
  ref_dir, result = peer_run
  got = trainer.train_and_evaluate(tiny_config(**PEER, **{"mesh.data": 2, "mesh.model": 4}),
                                   str(tmp_path))
  assert got["mlm_loss"] == pytest.approx(result["mlm_loss"], rel=1e-5)
  assert_params_close(final_params(str(tmp_path)), final_params(ref_dir))

