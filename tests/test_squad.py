"""SQuAD v1.1: JSON/TFDS reading, windowed features, and span decoding round trips."""

import json

import numpy as np
import pytest

from pkm_jax.data.tokenizer import train_tokenizer
from pkm_jax.tasks import squad
from pkm_jax.tasks.task_metrics import squad_metrics

MAX_SEQ, MAX_QUERY, STRIDE = 40, 8, 10

_WORDS = ("river bank stone city Zürich café museum opened in the year of a naïve plan for "
          "trains and ships near Paris; U.S. $5.2 million (1990) - e.g. it's co-op 42% "
          "well-known").split()


def _context(seed: int, n_words: int) -> str:
  """Long text with punctuation, accents and odd white space (tabs, runs, newlines)."""
  rng = np.random.default_rng(seed)
  seps = [" ", " ", " ", "  ", "\t", " \n ", " "]
  words = rng.choice(_WORDS, n_words)
  return "".join(w + seps[i % len(seps)] for i, w in enumerate(words)).strip()


@pytest.fixture(scope="module")
def tokenizer():
  texts = [_context(s, 150) for s in range(6)] + ["Where did what happen and when was it?"]
  return train_tokenizer(texts, vocab_size=200)


def _tokens(tokenizer, text):
  enc = tokenizer.encode(text, add_special_tokens=False)
  return enc.ids, enc.offsets


def _room(tokenizer, question):
  return MAX_SEQ - min(len(_tokens(tokenizer, question)[0]), MAX_QUERY) - 3


def _span_example(tokenizer, qid, question, context, first_tok, last_tok):
  """An example whose answer is exactly context tokens [first_tok, last_tok] (chosen by token)."""
  _, offsets = _tokens(tokenizer, context)
  start, end = offsets[first_tok][0], offsets[last_tok][1]
  return squad.SquadExample(qid, question, context, (context[start:end],), (start,))


@pytest.fixture(scope="module")
def examples(tokenizer):
  """Examples of several windows each, answers at and across window boundaries."""
  out = []
  for seed in range(4):
    context = _context(seed, 120)
    question = "Where did what happen and when was it?"  # longer than MAX_QUERY tokens
    n_tokens = len(_tokens(tokenizer, context)[0])
    room = _room(tokenizer, question)
    assert STRIDE < room - 3 and n_tokens > 3 * room  # several overlapping windows
    spans = {
        "across": (room - 2, room + 1),  # runs past window 0's end; whole in window 1
        "ends_at_edge": (room - 4, room - 1),  # last token of window 0; also in window 1
        "starts_at_stride": (STRIDE, STRIDE + 2),  # first token of window 1
        "first": (0, 1), "last": (n_tokens - 3, n_tokens - 1),
        "long": (2 * STRIDE + 1, 2 * STRIDE + 9),
    }
    for name, (a, b) in spans.items():
      out.append(_span_example(tokenizer, f"{seed}-{name}", question, context, a, b))
  # Hand-placed answers with punctuation, accents and inner white space.
  context = "In 1990 (the U.S.) paid $5.2 million to Zürich's café -- e.g.  New \t York, too."
  for answer in ("(the U.S.)", "$5.2 million", "Zürich's café", "e.g.  New \t York,", "too."):
    out.append(squad.SquadExample(f"hand-{answer}", "What was paid?", context, (answer,),
                                  (context.index(answer),)))
  return out


def test_windows_match_an_independent_layout(tokenizer, examples):
  feats = squad.prepare_features(examples, tokenizer, max_seq_len=MAX_SEQ,
                                 max_query_len=MAX_QUERY, doc_stride=STRIDE)
  cls, sep, pad = (tokenizer.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]"))
  assert feats.input_ids.shape == (len(feats), MAX_SEQ)
  for e, ex in enumerate(examples):
    rows = np.flatnonzero(feats.example_index == e)
    assert rows.size and (np.diff(rows) == 1).all()  # an example's windows are consecutive
    q_ids = _tokens(tokenizer, ex.question)[0][:MAX_QUERY]
    c_ids, c_offsets = _tokens(tokenizer, ex.context)
    room = MAX_SEQ - len(q_ids) - 3
    covered = np.zeros(len(c_ids), bool)
    for k, f in enumerate(rows):
      start = k * STRIDE  # BERT's run_squad.py: windows start every doc_stride tokens
      window = c_ids[start:start + room]
      ids = [cls, *q_ids, sep, *window, sep]
      n = len(ids)
      assert feats.input_ids[f, :n].tolist() == ids
      assert (feats.input_ids[f, n:] == pad).all()
      assert feats.attention_mask[f].tolist() == [1] * n + [0] * (MAX_SEQ - n)
      assert feats.token_type_ids[f].tolist() == ([0] * (len(q_ids) + 2) + [1] * (len(window) + 1)
                                                  + [0] * (MAX_SEQ - n))
      ctx = slice(len(q_ids) + 2, len(q_ids) + 2 + len(window))
      assert feats.offsets[f, ctx].tolist() == [list(o) for o in c_offsets[start:start + room]]
      outside = np.ones(MAX_SEQ, bool)
      outside[ctx] = False
      assert (feats.offsets[f][outside] == -1).all()  # offsets only for context tokens
      covered[start:start + len(window)] = True
      # Gold positions: the tokens overlapping the answer's characters, if all in this window.
      a0 = ex.answer_starts[0]
      a1 = a0 + len(ex.answers[0])
      hit = [i for i, (s, t) in enumerate(c_offsets) if s < a1 and t > a0]
      if start <= hit[0] and hit[-1] < start + len(window):
        assert (feats.start_positions[f], feats.end_positions[f]) == (
            hit[0] - start + ctx.start, hit[-1] - start + ctx.start)
      else:
        assert feats.start_positions[f] == feats.end_positions[f] == 0
    assert covered.all() and start + len(window) == len(c_ids)  # the last window reaches the end
  assert (feats.start_positions > 0).sum() > len(examples)  # answers seen by several windows


def test_single_window_equals_the_tokenizers_pair_encoding(tokenizer, examples):
  ex = examples[-1]  # short context: one window
  feats = squad.prepare_features([ex], tokenizer, max_seq_len=128, max_query_len=64)
  ref = tokenizer.encode(ex.question, ex.context)  # the Rust [CLS] $A [SEP] $B:1 [SEP]:1 template
  assert len(feats) == 1
  n = len(ref.ids)
  assert feats.input_ids[0, :n].tolist() == ref.ids
  assert feats.token_type_ids[0, :n].tolist() == ref.type_ids


def _perfect_logits(feats, value=10.0):
  """One-hot logits at the gold start/end of every window that holds the answer."""
  start = np.zeros(feats.input_ids.shape, np.float32)
  end = np.zeros(feats.input_ids.shape, np.float32)
  rows = np.flatnonzero(feats.start_positions > 0)
  start[rows, feats.start_positions[rows]] = value
  end[rows, feats.end_positions[rows]] = value
  return start, end


def test_perfect_logits_round_trip_to_the_gold_text(tokenizer, examples):
  feats = squad.prepare_features(examples, tokenizer, max_seq_len=MAX_SEQ,
                                 max_query_len=MAX_QUERY, doc_stride=STRIDE)
  per_example = np.bincount(feats.example_index, minlength=len(examples))
  assert (per_example[:-5] >= 4).all()  # the generated examples span several windows
  # The "across" answer is cut by window 0 (CLS label there) and whole in window 1.
  across = [i for i, ex in enumerate(examples) if ex.qid.endswith("-across")]
  for e in across:
    rows = np.flatnonzero(feats.example_index == e)
    assert feats.start_positions[rows[0]] == 0 and feats.start_positions[rows[1]] > 0
  start, end = _perfect_logits(feats)
  preds = squad.postprocess(examples, feats, start, end)
  assert preds == {ex.qid: ex.answers[0] for ex in examples}
  assert squad_metrics(squad.gold_answers(examples), preds) == {"exact_match": 100.0,
                                                                "f1": 100.0}


def test_answer_with_outer_white_space_maps_to_its_words(tokenizer):
  context = "The museum  opened in 1990 near Paris."
  answer = "  opened in 1990 "  # SQuAD answers sometimes carry spaces: they must not widen
  ex = squad.SquadExample("ws", "When?", context, (answer,), (context.index(answer),))
  feats = squad.prepare_features([ex], tokenizer, max_seq_len=64, max_query_len=8)
  preds = squad.postprocess([ex], feats, *_perfect_logits(feats))
  assert preds == {"ws": "opened in 1990"}


def _brute_force_best(examples, feats, start, end, max_answer_len):
  best = {}
  for f in range(len(feats)):
    ex = examples[feats.example_index[f]]
    ctx = np.flatnonzero(feats.offsets[f, :, 0] >= 0)
    for s in ctx:
      for e in ctx:
        if s <= e < s + max_answer_len:
          score = float(start[f, s]) + float(end[f, e])
          text = ex.context[feats.offsets[f, s, 0]:feats.offsets[f, e, 1]]
          if ex.qid not in best or score > best[ex.qid][1]:
            best[ex.qid] = (text, score)
  return best


@pytest.mark.parametrize("max_answer_len", [1, 4, 30])
def test_decoding_finds_the_best_valid_span(tokenizer, examples, max_answer_len):
  feats = squad.prepare_features(examples[:8], tokenizer, max_seq_len=MAX_SEQ,
                                 max_query_len=MAX_QUERY, doc_stride=STRIDE)
  rng = np.random.default_rng(max_answer_len)
  start = rng.normal(size=feats.input_ids.shape)
  end = rng.normal(size=feats.input_ids.shape)
  end[:, 0] = start[:, 0] = 50.0  # [CLS] and question tokens must never be chosen
  end[:, 3] = start[:, 3] = 50.0
  nbest = squad.nbest_answers(examples[:8], feats, start, end, n_best_size=5,
                              max_answer_len=max_answer_len)
  ref = _brute_force_best(examples[:8], feats, start, end, max_answer_len)
  for qid, (text, score) in ref.items():
    assert nbest[qid][0][0] == text and nbest[qid][0][1] == pytest.approx(score)
    scores = [s for _, s in nbest[qid]]
    assert len(nbest[qid]) == 5 and scores == sorted(scores, reverse=True)
    assert len({t for t, _ in nbest[qid]}) == 5  # distinct texts
  preds = squad.postprocess(examples[:8], feats, start, end, max_answer_len=max_answer_len)
  assert preds == {qid: text for qid, (text, _) in ref.items()}
  with pytest.raises(ValueError, match="do not match the features"):
    squad.postprocess(examples[:8], feats, start[:, :-1], end)


def test_tokenizer_settings_do_not_change_features(tokenizer, examples):
  from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
  odd = Tokenizer.from_str(tokenizer.to_str())
  odd.post_processor = None
  odd.enable_truncation(6)
  odd.enable_padding(length=64)
  kw = dict(max_seq_len=MAX_SEQ, max_query_len=MAX_QUERY, doc_stride=STRIDE)
  ref = squad.prepare_features(examples, tokenizer, **kw)
  got = squad.prepare_features(examples, odd, **kw)
  for name in ("input_ids", "attention_mask", "token_type_ids", "start_positions",
               "end_positions", "example_index", "offsets"):
    np.testing.assert_array_equal(getattr(got, name), getattr(ref, name))
  assert set(ref.arrays()) == {"input_ids", "attention_mask", "token_type_ids",
                               "start_positions", "end_positions"}
  with pytest.raises(ValueError, match="leaves no room for context"):
    squad.prepare_features(examples, tokenizer, max_seq_len=11, max_query_len=8)


# ----------------------------------------------------------------------------------- reading
_DATASET = {"version": "1.1", "data": [
    {"title": "Paris", "paragraphs": [
        {"context": "Paris is the capital of France.",
         "qas": [{"id": "p1", "question": "What is the capital of France?",
                  "answers": [{"text": "Paris", "answer_start": 0},
                              {"text": "Paris", "answer_start": 0}]},
                 {"id": "p2", "question": "Of what is Paris the capital?",
                  "answers": [{"text": "France", "answer_start": 24}]}]}]},
    {"title": "Zürich", "paragraphs": [
        {"context": "Zürich's café opened in 1990.",
         "qas": [{"id": "z1", "question": "When?",
                  "answers": [{"text": "1990", "answer_start": 24},
                              {"text": "in 1990", "answer_start": 21}]}]}]},
]}
_EXPECTED = [
    squad.SquadExample("p1", "What is the capital of France?", "Paris is the capital of France.",
                       ("Paris", "Paris"), (0, 0), "Paris"),
    squad.SquadExample("p2", "Of what is Paris the capital?", "Paris is the capital of France.",
                       ("France",), (24,), "Paris"),
    squad.SquadExample("z1", "When?", "Zürich's café opened in 1990.", ("1990", "in 1990"),
                       (24, 21), "Zürich"),
]


def test_reads_official_json(tmp_path):
  (tmp_path / "dev-v1.1.json").write_text(json.dumps(_DATASET), encoding="utf-8")
  got = squad.load_squad("dev", data_dir=str(tmp_path))
  assert got == _EXPECTED
  for ex in got:  # the fixture's offsets are right, so the check below is meaningful
    assert all(ex.context[s:s + len(t)] == t for t, s in zip(ex.answers, ex.answer_starts))
  assert squad.load_squad("validation", data_dir=str(tmp_path)) == _EXPECTED
  assert squad.gold_answers(got) == {"p1": ["Paris", "Paris"], "p2": ["France"],
                                     "z1": ["1990", "in 1990"]}


def _broken(edit):
  data = json.loads(json.dumps(_DATASET))
  edit(data)
  return json.dumps(data)


@pytest.mark.parametrize("text,message", [
    ('{"data": [', r"is not valid JSON: Expecting value: line 1 column 11"),
    ("[]", r"the top level has no 'data'"),
    (_broken(lambda d: d["data"][1]["paragraphs"][0]["qas"][0].pop("id")),
     r"data\[1\]\.paragraphs\[0\]\.qas\[0\] has no 'id'"),
    (_broken(lambda d: d["data"][0]["paragraphs"][0]["qas"][1]["answers"][0].update(
        answer_start="24")), r"qas\[1\]\.answers\[0\]\.answer_start is str, expected int"),
    (_broken(lambda d: d["data"][0]["paragraphs"][0]["qas"][1]["answers"][0].update(
        answer_start=29)), r"answer 'France' at character 29 lies outside its context"),
    (_broken(lambda d: d["data"][0]["paragraphs"][0]["qas"][1].update(answers=[])),
     r"question 'p2' has no answer"),
    (_broken(lambda d: d["data"][1]["paragraphs"][0]["qas"][0].update(id="p1")),
     r"question id 'p1' appears twice"),
    ('{"data": []}', r"holds no questions"),
])
def test_malformed_json_is_a_one_line_error(tmp_path, text, message):
  (tmp_path / "train-v1.1.json").write_text(text, encoding="utf-8")
  with pytest.raises(ValueError, match=r"^SQuAD: .*train-v1\.1\.json[^\n]*" + message + r"[^\n]*$"):
    squad.load_squad("train", data_dir=str(tmp_path))


def test_missing_file_and_bad_arguments(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"^SQuAD: .*dev-v1\.1\.json not found$"):
    squad.load_squad("dev", data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="no split 'test'"):
    squad.load_squad("test", data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="needs data_dir"):
    squad.load_squad("dev")


tfds = pytest.importorskip("tensorflow_datasets")


def test_tfds_gives_the_same_examples_as_the_json(tmp_path):
  """The same questions served as TFDS squad/v1.1 examples (bytes, answer arrays) and as JSON."""
  # pylint: disable=g-import-not-at-top  # registers the builder (not automatic without TF)
  import tensorflow_datasets.question_answering.squad  # noqa: F401

  def as_data_source(builder, split, **unused_kwargs):
    assert builder.builder_config.name == "v1.1" and split == "validation"
    return [{"id": ex.qid.encode(), "title": ex.title.encode(), "context": ex.context.encode(),
             "question": ex.question.encode(),
             "answers": {"text": np.array([t.encode() for t in ex.answers], object),
                         "answer_start": np.array(ex.answer_starts, np.int32)}}
            for ex in _EXPECTED]

  with tfds.testing.mock_data(as_data_source_fn=as_data_source):
    assert squad.load_squad("dev", source="tfds") == _EXPECTED
  with pytest.raises(ValueError, match=r"^TFDS dataset 'squad/v1.1' split 'validation' .* cannot be "
                                       r"read: [^\n]*$"):
    squad.load_squad("dev", source="tfds", data_dir=str(tmp_path))
