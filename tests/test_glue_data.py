"""GLUE readers (official TSV layouts, TFDS data_source) and pair encoding."""

import os

import numpy as np
import pytest

from pkm_jax.data.tokenizer import train_tokenizer
from pkm_jax.tasks import glue

# TFDS's class names per task (tensorflow_datasets/text/glue.py), written out here independently:
# labels must come out as indices into these lists from either source.
CLASSES = {"cola": ["unacceptable", "acceptable"], "sst2": ["negative", "positive"],
           "mrpc": ["not_equivalent", "equivalent"], "qqp": ["not_duplicate", "duplicate"],
           "stsb": None, "mnli": ["entailment", "neutral", "contradiction"],
           "qnli": ["entailment", "not_entailment"], "rte": ["entailment", "not_entailment"],
           "wnli": ["not_entailment", "entailment"]}
MNLI_TRAIN_HEADER = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\t"
                     "sentence2_binary_parse\tsentence1_parse\tsentence2_parse\tsentence1\t"
                     "sentence2\tlabel1\tgold_label")
MNLI_DEV_HEADER = MNLI_TRAIN_HEADER.replace("label1\t", "label1\tlabel2\tlabel3\tlabel4\tlabel5\t")


def _rows(task, split):
  """(text_a, text_b, class name | score) rows; split-specific so splits cannot be swapped."""
  s = split.upper()
  pair = {
      "cola": [(f"Our friends won't buy this analysis {s}.", None, "acceptable"),
               (f"They drank the pub {s}.", None, "unacceptable"),
               (f"The more you eat, the fatter you get {s}.", None, "acceptable")],
      "sst2": [(f"hide new secretions from the parental units {s} ", None, "negative"),
               (f"the greatest musicians {s} ", None, "positive")],
      "mrpc": [(f'Amrozi accused his brother , whom he called " the witness " {s} .',
                "Referring to him as only \" the witness \" , Amrozi accused his brother .",
                "equivalent"),
               (f"Yucaipa owned Dominick 's {s} .", "Yucaipa bought\rDominick 's in 1995 .",
                "not_equivalent")],
      "stsb": [(f"A plane is taking off {s}.", "An air plane is taking off.", 5.0),
               (f"A man is playing a flute {s}.", "A man is playing a flute.", 3.8),
               (f"A woman is slicing onion {s}.", "A dog runs.", 0.0)],
      "qqp": [(f"How is the life of a math student {s}?", "Which level is enough for jlpt5?",
               "not_duplicate"),
              (f"How do I control my horny emotions {s}?", "How do you control your horniness?",
               "duplicate")],
      "mnli": [(f"Conceptually cream skimming has two basic dimensions {s}.",
                "Product and geography are what make cream skimming work.", "neutral"),
               (f"you know during the season {s}", "You lose the things to the following level.",
                "entailment"),
               (f"One of our number will carry out your instructions {s}.",
                "A member of my team will execute your orders.", "contradiction")],
      "qnli": [(f"When did the third Digimon series begin {s}?",
                "Unlike the two seasons before it, Digimon Tamers takes a darker approach.",
                "not_entailment"),
               (f"Which missile batteries often have individual launchers {s}?",
                "When MANPADS is operated by specialists, batteries may have launchers.",
                "entailment")],
      "rte": [(f"No Weapons of Mass Destruction Found in Iraq Yet {s}.",
               "Weapons of Mass Destruction Found in Iraq.", "not_entailment"),
              (f"A place of sorrow, after Pope John Paul II died {s}.",
               "Pope Benedict XVI is the new leader.", "entailment")],
      "wnli": [(f"I stuck a pin through a carrot {s}.", "The carrot had a hole.", "entailment"),
               (f"John couldn't see the stage with Billy in front of him {s}.",
                "John is so short.", "not_entailment")],
  }
  return pair[task]


def _file_label(task, label):
  """How the official files write a label: 0/1 indices, NLI names, or a '%.3f' score."""
  if task == "stsb":
    return f"{label:.3f}"
  if task in ("mnli", "qnli", "rte"):
    return label
  return str(CLASSES[task].index(label))


def _tsv(task, split, rows):
  """The lines of an official GLUE TSV holding `rows` (header first, except CoLA)."""
  out = []
  for i, (a, b, label) in enumerate(rows):
    lab = _file_label(task, label)
    if task == "cola":
      out.append(f"gj04\t{lab}\t{'' if lab == '1' else '*'}\t{a}")
    elif task == "sst2":
      out.append(f"{a}\t{lab}")
    elif task == "mrpc":
      out.append(f"{lab}\t{702876 + i}\t{702977 + i}\t{a}\t{b}")
    elif task == "stsb":
      out.append(f"{i}\tmain-captions\tMSRvid\t2012test\t{i + 1:04d}\tnone\tnone\t{a}\t{b}\t{lab}")
    elif task == "qqp":
      out.append(f"{133273 + i}\t{213221 + 2 * i}\t{213222 + 2 * i}\t{a}\t{b}\t{lab}")
    elif task == "mnli":
      parses = "\t".join(["( ( x ) )", "( ( y ) )", "(ROOT (S x))", "(ROOT (S y))"])
      votes = lab if split == "train" else "\t".join([lab, "neutral", lab, lab, lab])
      out.append(f"{i}\t{31193 + i}\t{31193 + i}n\tgovernment\t{parses}\t{a}\t{b}\t{votes}\t{lab}")
    else:  # qnli, rte, wnli
      out.append(f"{i}\t{a}\t{b}\t{lab}")
  default = "index\tsentence1\tsentence2\tlabel"  # RTE, WNLI
  header = {"cola": None, "sst2": "sentence\tlabel",
            "mrpc": "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String",
            "stsb": "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\t"
                    "sentence2\tscore",
            "qqp": "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
            "mnli": MNLI_TRAIN_HEADER if split == "train" else MNLI_DEV_HEADER,
            "qnli": "index\tquestion\tsentence\tlabel"}.get(task, default)
  return ([header] if header else []) + out


def _expected(task, split, rows):
  return [glue.GlueExample(a, b, label if task == "stsb" else CLASSES[task].index(label),
                           f"{task}-{split}-{i}") for i, (a, b, label) in enumerate(rows)]


DIRS = {"cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "stsb": "STS-B", "qqp": "QQP",
        "mnli": "MNLI", "qnli": "QNLI", "rte": "RTE", "wnli": "WNLI"}
SPLITS = {t: ("train", "dev_matched", "dev_mismatched") if t == "mnli" else ("train", "dev")
          for t in DIRS}


def _write(path, lines, end="\n"):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8", newline="") as f:
    f.write("".join(line + end for line in lines))


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("glue")
  for task, splits in SPLITS.items():
    for split in splits:
      # MRPC with CRLF line ends (its source files have them) and a stray "\r" in a sentence.
      _write(str(root / DIRS[task] / f"{split}.tsv"), _tsv(task, split, _rows(task, split)),
             end="\r\n" if task == "mrpc" else "\n")
  return str(root)


def test_registry():
  assert sorted(glue.TASKS) == sorted(DIRS)
  for name, spec in glue.TASKS.items():
    assert spec.dir_name == DIRS[name]
    assert spec.is_regression == (CLASSES[name] is None)
    assert spec.num_labels == (1 if CLASSES[name] is None else len(CLASSES[name]))
    assert spec.labels == (None if CLASSES[name] is None else tuple(CLASSES[name]))
    assert spec.is_pair == (name not in ("cola", "sst2"))
    assert (spec.train_split, *spec.dev_splits) == SPLITS[name]
  assert glue.TASKS["cola"].metrics == ("matthews",)
  assert glue.TASKS["stsb"].metrics == ("pearson", "spearmanr")
  assert glue.TASKS["qqp"].metrics == ("f1", "accuracy")
  with pytest.raises(ValueError, match="unknown GLUE task 'squad'"):
    glue.get_task("squad")


@pytest.mark.parametrize("task", list(DIRS))
def test_reads_official_layout(glue_dir, task):
  for split in SPLITS[task]:
    got = glue.load_glue(task, split, data_dir=glue_dir)
    assert got == _expected(task, split, _rows(task, split)), (task, split)
  # TFDS split names address the same files.
  dev = SPLITS[task][1]
  tfds_name = dev.replace("dev", "validation")
  assert glue.load_glue(task, tfds_name, data_dir=glue_dir) == glue.load_glue(
      task, dev, data_dir=glue_dir)


def test_cola_first_line_is_data_and_mnli_dev_sets_differ(glue_dir):
  # CoLA has no header: the first line is an example (3 rows written, 3 read).
  assert len(glue.load_glue("cola", "train", data_dir=glue_dir)) == 3
  matched = glue.load_glue("mnli", "dev_matched", data_dir=glue_dir)
  mismatched = glue.load_glue("mnli", "dev_mismatched", data_dir=glue_dir)
  assert [e.text_a for e in matched] != [e.text_a for e in mismatched]
  with pytest.raises(ValueError, match="no split 'dev'"):
    glue.load_glue("mnli", "dev", data_dir=glue_dir)


def test_qqp_skips_malformed_rows(tmp_path):
  rows = _rows("qqp", "train")
  lines = _tsv("qqp", "train", rows)
  # The kind of row the official QQP train.tsv holds: a question with tabs cut short.
  lines.insert(2, "\tWas Muhammad a real historical figure? What is the evidence?\t0")
  lines.insert(3, "1\t2\t3\tq1\tq2\tmaybe")  # unparsable label
  _write(str(tmp_path / "QQP" / "train.tsv"), lines)
  got = glue.load_glue("qqp", "train", data_dir=str(tmp_path))
  assert [(e.text_a, e.text_b, e.label) for e in got] == [
      (a, b, CLASSES["qqp"].index(lab)) for a, b, lab in rows]
  # guids count every data row, as TFDS's idx: the good rows are rows 0 and 3.
  assert [e.guid for e in got] == ["qqp-train-0", "qqp-train-3"]


def test_malformed_and_missing_files_raise_one_line_errors(tmp_path):
  lines = _tsv("sst2", "train", _rows("sst2", "train") * 3)  # header + 6 rows
  lines.insert(6, "a sentence without its label")  # file line 7
  path = str(tmp_path / "SST-2" / "train.tsv")
  _write(path, lines)
  with pytest.raises(ValueError, match=r"^GLUE sst2: .*SST-2/train.tsv line 7: expected 2 "
                                       r"columns, got 1$"):
    glue.load_glue("sst2", "train", data_dir=str(tmp_path))
  lines[6] = "a sentence\t2"
  _write(path, lines)
  with pytest.raises(ValueError, match=r"line 7: invalid label '2' \(expected \['0', '1'\]\)$"):
    glue.load_glue("sst2", "train", data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match=r"^GLUE sst2: .*SST-2/dev.tsv not found$"):
    glue.load_glue("sst2", "dev", data_dir=str(tmp_path))
  _write(str(tmp_path / "STS-B" / "train.tsv"),
         ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\t1"])
  with pytest.raises(ValueError, match=r"STS-B/train.tsv has no column 'score'"):
    glue.load_glue("stsb", "train", data_dir=str(tmp_path))
  _write(str(tmp_path / "STS-B" / "dev.tsv"), _tsv("stsb", "dev", [("a", "b", 1.0)])[:1])
  with pytest.raises(ValueError, match=r"STS-B/dev.tsv holds no examples"):
    glue.load_glue("stsb", "dev", data_dir=str(tmp_path))
  _write(str(tmp_path / "RTE" / "dev.tsv"), [])
  with pytest.raises(ValueError, match=r"RTE/dev.tsv is empty"):
    glue.load_glue("rte", "dev", data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="needs data_dir"):
    glue.load_glue("rte", "dev")
  with pytest.raises(ValueError, match="not one of"):
    glue.load_glue("rte", "dev", source="hub", data_dir=str(tmp_path))


# ---------------------------------------------------------------------------------------- TFDS
tfds = pytest.importorskip("tensorflow_datasets")


def test_tfds_random_mock_maps_features():
  """tfds.testing.mock_data's random examples, read by us and straight from data_source."""
  import tensorflow_datasets.text.glue  # noqa: F401  pylint: disable=g-import-not-at-top
  with tfds.testing.mock_data(num_examples=4):
    for task, features in [("mnli", ("premise", "hypothesis")), ("cola", ("sentence", None)),
                           ("stsb", ("sentence1", "sentence2")),
                           ("qnli", ("question", "sentence"))]:
      split = "validation_matched" if task == "mnli" else "validation"
      got = glue.read_glue_tfds(task, split, data_dir="/nonexistent")
      source = tfds.data_source(f"glue/{task}", split=split)
      assert len(got) == len(source) == 4
      for ex, row in zip(got, (source[i] for i in range(4))):
        assert ex.text_a == row[features[0]]
        assert ex.text_b == (row[features[1]] if features[1] else None)
        assert ex.label == (float(row["label"]) if task == "stsb" else int(row["label"]))
        assert ex.guid == f"{task}-{split.replace('validation', 'dev')}-{int(row['idx'])}"


def test_tfds_and_files_give_the_same_examples(glue_dir):
  """The same rows served as TFDS examples (bytes text, class ids) and as official TSVs."""
  import tensorflow_datasets.text.glue  # noqa: F401  pylint: disable=g-import-not-at-top
  names = {"cola": ("sentence",), "sst2": ("sentence",), "mrpc": ("sentence1", "sentence2"),
           "stsb": ("sentence1", "sentence2"), "qqp": ("question1", "question2"),
           "mnli": ("premise", "hypothesis"), "qnli": ("question", "sentence"),
           "rte": ("sentence1", "sentence2"), "wnli": ("sentence1", "sentence2")}

  def as_data_source(builder, split, **unused_kwargs):
    task = builder.builder_config.name
    rows = _rows(task, split.replace("validation", "dev"))
    return [{**{k: t.encode() for k, t in zip(names[task], (a, b))},
             "label": np.float32(lab) if task == "stsb" else np.int64(CLASSES[task].index(lab)),
             "idx": np.int32(i)} for i, (a, b, lab) in enumerate(rows)]

  with tfds.testing.mock_data(as_data_source_fn=as_data_source):
    for task in DIRS:
      for split in SPLITS[task]:
        from_files = glue.load_glue(task, split, data_dir=glue_dir)
        from_tfds = glue.load_glue(task, split, source="tfds")
        if task == "stsb":  # float32 in TFDS: compare scores approximately
          assert [e.label for e in from_tfds] == pytest.approx([e.label for e in from_files])
          from_tfds = [glue.GlueExample(e.text_a, e.text_b, f.label, e.guid)
                       for e, f in zip(from_tfds, from_files)]
        assert from_tfds == from_files, (task, split)


def test_tfds_missing_dataset_is_one_line_error(tmp_path):
  with pytest.raises(ValueError, match=r"^TFDS dataset 'glue/rte' split 'validation' .* cannot be "
                                       r"read: [^\n]*$"):
    glue.load_glue("rte", "dev", source="tfds", data_dir=str(tmp_path))


# ------------------------------------------------------------------------------------ encoding
@pytest.fixture(scope="module")
def tokenizer():
  texts = [a + " " + (b or "") for t in DIRS for s in SPLITS[t] for a, b, _ in _rows(t, s)]
  return train_tokenizer(texts * 3, vocab_size=300)


def _reference_truncate(a, b, budget):
  """BERT's _truncate_seq_pair, literally: pop from the longer list, from b on ties."""
  a, b = list(a), list(b)
  while len(a) + len(b) > budget:
    (a if len(a) > len(b) else b).pop()
  return a, b


@pytest.mark.parametrize("task", ["mnli", "sst2", "stsb"])
@pytest.mark.parametrize("max_len", [64, 12, 7])
def test_encode_matches_tokenizer_template_and_bert_truncation(glue_dir, tokenizer, task, max_len):
  examples = glue.load_glue(task, "train", data_dir=glue_dir)
  out = glue.encode_glue(task, examples, tokenizer, max_len)
  assert out["input_ids"].shape == out["attention_mask"].shape == (len(examples), max_len)
  assert out["labels"].dtype == (np.float32 if task == "stsb" else np.int32)
  np.testing.assert_allclose(out["labels"], [e.label for e in examples], rtol=1e-6)
  cls, sep, pad = (tokenizer.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]"))
  truncated = 0
  for i, ex in enumerate(examples):
    a = tokenizer.encode(ex.text_a, add_special_tokens=False).ids
    b = tokenizer.encode(ex.text_b, add_special_tokens=False).ids if ex.text_b else []
    budget = max_len - (3 if ex.text_b is not None else 2)
    truncated += len(a) + len(b) > budget
    if len(a) + len(b) <= budget:  # fits: exactly the tokenizer's own [CLS] a [SEP] b [SEP]
      ref = tokenizer.encode(ex.text_a, ex.text_b) if ex.text_b else tokenizer.encode(ex.text_a)
      ids, types = ref.ids, ref.type_ids
    else:
      a, b = _reference_truncate(a, b, budget)
      ids = [cls, *a, sep] + ([*b, sep] if ex.text_b is not None else [])
      types = [0] * (len(a) + 2) + [1] * (len(ids) - len(a) - 2)
    n = len(ids)
    assert out["input_ids"][i, :n].tolist() == ids
    assert out["token_type_ids"][i, :n].tolist() == types
    assert (out["input_ids"][i, n:] == pad).all() and (out["token_type_ids"][i, n:] == 0).all()
    assert out["attention_mask"][i].tolist() == [1] * n + [0] * (max_len - n)
  if max_len == 7:
    assert truncated == len(examples)  # the truncation branch was exercised


def test_encode_ignores_the_tokenizers_own_padding_and_truncation(glue_dir, tokenizer):
  from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
  examples = glue.load_glue("rte", "dev", data_dir=glue_dir)
  ref = glue.encode_glue("rte", examples, tokenizer, 32)
  odd = Tokenizer.from_str(tokenizer.to_str())
  odd.enable_truncation(5)
  odd.enable_padding(length=50)
  odd.post_processor = None
  got = glue.encode_glue("rte", examples, odd, 32)
  for key in ref:
    np.testing.assert_array_equal(got[key], ref[key])
  assert odd.truncation is not None  # the caller's tokenizer is left as it was
  with pytest.raises(ValueError, match="max_len=3 leaves no room"):
    glue.encode_glue("rte", examples, tokenizer, 3)
