"""benchmarks/knowledge.py --quick end to end: results.json's keys and the relations between its
numbers (accuracies in [0, 1], each drop = before - after of the recorded accuracies, the
interpolation at the target on the sweep's polyline, memory methods writing no row outside their
selection, LoRA and the memory methods writing what they may); the fact-accuracy masking against
fill_mask's predictions on hand-masked text; world B's names against A's."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "knowledge.py")
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import knowledge  # noqa: E402
import knowledge_world as kw  # noqa: E402

METHODS = knowledge.METHODS if knowledge.has_methods() else ("full",)


@pytest.fixture(scope="module")
def out(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("knowledge"))
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"  # one CPU device, as a user runs it
  proc = subprocess.run([sys.executable, SCRIPT, "--quick", f"--out={out}",
                         f"--methods={','.join(METHODS)}"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return out


@pytest.fixture(scope="module")
def report(out):
  with open(os.path.join(out, "results.json")) as f:
    return json.load(f)


def test_results_have_per_seed_lists_for_every_method(out, report):
  assert set(report["methods"]) == set(METHODS)
  for r in report["methods"].values():
    for key in ("new_fact_accuracy", "old_fact_accuracy_drop", "drop_at_target", "sweep"):
      assert key in r
    assert len(r["new_fact_accuracy"]) == len(r["old_fact_accuracy_drop"]) == report["seeds"]
  with open(os.path.join(out, "results.md")) as f:
    md = f.read()
  for method in METHODS:
    assert f"| {method} |" in md
  assert os.path.getsize(os.path.join(out, "learning_forgetting.png")) > 1000


def _views(report):
  """(templates, target, methods) of the headline view and of every other view."""
  yield report["primary_templates"], report["target_b_accuracy"], report["methods"]
  for t, v in report["views"].items():
    yield t, v["target"], v["methods"]


def test_accuracies_and_drops_follow_from_the_recorded_values(report):
  before = report["before"]
  assert {t for t, _, _ in _views(report)} == {"held_out", "train"}
  for templates, _, methods in _views(report):
    b, a = ("acc_b", "acc_a") if templates == "held_out" else ("acc_b_train", "acc_a_train")
    assert 0.0 <= before[a] <= 1.0 and 0.0 <= before[b] <= 1.0
    for r in methods.values():
      sweep = r["sweep"]
      op = sweep["steps"].index(r["operating_step"])
      for i, seed in enumerate(sweep["seeds"]):
        points = r["points"][str(seed)]
        assert [p["step"] for p in points] == sweep["steps"][1:]
        after = points[op - 1]
        assert 0.0 <= after[a] <= 1.0 and 0.0 <= after[b] <= 1.0
        assert r["new_fact_accuracy"][i] == after[b]
        assert r["old_fact_accuracy_drop"][i] == before[a] - after[a]
        if before[a] > 0:
          assert np.isclose(r["old_fact_relative_drop"][i], (before[a] - after[a]) / before[a])
        # The overall accuracy is the question-weighted mean of the per-relation ones.
        rel = after[f"{b}_by_relation"]
        assert min(rel.values()) <= after[b] <= max(rel.values())


def test_drop_at_target_lies_on_the_sweep(report):
  for _, target, methods in _views(report):
    _check_on_sweep(target, methods)


def _check_on_sweep(target, methods):
  for r in methods.values():
    sweep = r["sweep"]
    for xs, ys, got in zip(sweep["new_fact_accuracy"], sweep["old_fact_accuracy_drop"],
                           r["drop_at_target"]):
      if got is None:
        assert max(xs) < target
        continue
      on = [np.isclose(got, y0 + (target - x0) / (x1 - x0) * (y1 - y0)) if x1 != x0
            else np.isclose(got, y0)
            for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:])
            if min(x0, x1) <= target <= max(x0, x1)]
      assert any(on) or (xs[0] >= target and got == ys[0])


def test_rows_written_respect_each_method(report):
  for method, r in report["methods"].items():
    for points in r["points"].values():
      for p in points:
        for layer, s in p["slots"].items():
          if method == "lora":
            assert s["written"] == 0, (layer, s)  # the memory is frozen under LoRA
          if method == "sparse_memory":
            assert "selected" in s and s["written_outside_selected"] == 0, (layer, s)
            assert s["written"] <= s["selected"]
          if method in ("memory", "sparse_memory", "full"):
            assert s["written"] > 0, (method, layer, s)
          assert 0 <= s["in_a_top"] <= s["written"]


def test_fact_masking_matches_fill_mask_on_hand_masked_text(out):
  """The evaluator's argmax at the answer's masked pieces equals fill_mask's top-1 for the same
  question written with [MASK]s by hand (one per piece of the answer tokenized alone)."""
  import jax.numpy as jnp
  import knowledge_eval as ke
  from pkm_jax import checkpoint as ckpt_lib
  from pkm_jax import fill_mask
  model, tokenizer, _ = ckpt_lib.restore_model(os.path.join(out, "pretrain"))
  s = knowledge.settings(quick=True)
  know = kw.make_knowledge(s["world"]["num_entities"], s["world"]["seed"], **s["b"])
  questions = list(know.questions_b[:6]) + list(know.questions_a[:6])
  ids, attn, target, where = ke.encode_questions(questions, tokenizer)
  graphdef, params, state = ke.split(model)
  ev = ke.Evaluator(graphdef, model.cfg, tokenizer, knowledge.pretrain_config(True).data,
                    {"q": questions})
  pred = np.asarray(ev.predict(params, state, jnp.asarray(ids), jnp.asarray(attn)))
  for row, q in enumerate(questions):
    pieces = tokenizer.encode(q.answer, add_special_tokens=False).ids
    assert list(target[row][where[row]]) == pieces  # the answer's pieces, in order
    text = q.text[:q.start] + " ".join(["[MASK]"] * len(pieces)) + q.text[q.end:]
    top1 = [m[0]["token_id"] for m in fill_mask.fill_mask(model, tokenizer, text, top_k=1)]
    assert list(pred[row][where[row]]) == top1
  known = ev.known(params, state, "q")
  assert list(known) == [bool(np.all(pred[r][where[r]] == target[r][where[r]]))
                         for r in range(len(questions))]


def test_world_b_is_new_and_states_only_b():
  s = knowledge.settings(quick=True)
  know = kw.make_knowledge(s["world"]["num_entities"], s["world"]["seed"], **s["b"])
  assert len(know.new_people) == s["b"]["new_people"]
  assert not set(know.new_people) & set(know.world_a.kinds)
  for p, r, old, new in know.changed:
    assert know.world_a.attributes[p][r] == old != new == know.world_b.attributes[p][r]
  b_subjects = set(know.world_b.kinds)
  assert all(f[0] not in b_subjects for f in know.probe_a)
  text = "\n".join(" ".join(d) for d in know.b_docs)
  assert all(new in text for _, _, _, new in know.changed)
  for q in know.questions_b + know.questions_a:
    assert q.text[q.start:q.end].lower() == q.answer.lower()  # a sentence start capitalizes
