"""Every command the README shows, run as written there -- paths under /ckpt, /data, /models and
/mnt moved into a temporary folder, and flags for tiny sizes appended (absl takes the last value
of a repeated flag) -- from a temporary checkout, in README order (later commands use what
earlier ones wrote, as a reader following the README would).

A README command this file does not know how to run fails `test_every_readme_command_is_run`,
so a documented command can never go untested.
"""

import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

import gcs_emulator
import hf_causal_fixtures
import hf_fixtures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
CHECKOUT_ENTRIES = ("train.py", "eval.py", "configs", "pkm_jax", "benchmarks", "notebooks",
                    "requirements.txt", "requirements-test.txt", "pyproject.toml", "README.md")

# Commands that are not run here, and why.
NOT_RUN = {
    "python3 -m venv .venv": "builds the environment: .ci/run does exactly this before the tests",
    ".venv/bin/pip install -r requirements.txt": "as above (.ci/run installs the same file)",
    ".venv/bin/pip install -r requirements-test.txt": "as above",
    ".venv/bin/pip install --no-deps -t .tpu": "as above (.ci/run installs libtpu the same way)",
    ".venv/bin/python -m pytest": "the test suite itself",
    "gcloud": "needs a TPU pod slice; the same train.py command runs below as one host",
    "python benchmarks/reproduce.py": (
        "tests/test_reproduce.py and tests/test_reproduce_causal.py run it (with --quick)"),
    "python benchmarks/accelerator.py": "tests/test_memory_layer_benchmark.py runs it (--tiny)",
    "python benchmarks/pod_plan.py": "tests/test_pod_plan.py runs it (with --quick)",
    "python benchmarks/serving.py": "tests/test_serving.py runs it (with --quick)",
    "python benchmarks/knowledge.py": "tests/test_knowledge.py runs it (with --quick)",
}
# The bucket the README's gs:// commands name: served by fake-gcs-server (tests/gcs_emulator.py).
README_BUCKET = "my-bucket"

TINY_TRAIN = ("--config.train.steps=4 --config.train.log_every=2 --config.train.eval_every=4 "
              "--config.train.checkpoint_every=2 --config.train.eval_batches=1 "
              "--config.train.memory_stats_every=2 --config.data.batch_size=8 "
              "--config.data.max_len=32 --config.data.vocab_size=300 "
              "--config.data.generated.num_entities=40 --config.data.generated.num_docs=200 "
              "--config.memory.n_keys=8 --config.memory.k=4 --config.memory.k_dim=16 "
              "--config.memory.heads=2")
# Sizes for configs/bert_*.py run from scratch (with init.pretrained the sizes are the
# pretrained model's and must stay at their defaults).
TINY_BERT = ("--config.model.hidden_size=32 --config.model.num_layers=2 "
             "--config.model.num_heads=2 --config.model.intermediate_size=64 "
             "--config.model.max_position_embeddings=64 --config.memory.layers=(0,1)")
TINY_FINETUNE = ("--config.train.steps=2 --config.train.log_every=1 --config.data.max_len=24 "
                 "--config.data.batch_size=8 --config.eval.batch_size=8 --config.mesh.data=1")
TINY_SQUAD = "--config.data.max_query_len=8 --config.data.doc_stride=8"


def readme_commands() -> list[str]:
  """Every command line of the README's bash blocks (continuations joined, comments dropped)."""
  text = open(README).read()
  commands = []
  for block in re.findall(r"```bash\n(.*?)```", text, re.S):
    for line in block.replace("\\\n", " ").splitlines():
      line = re.sub(r"\s+#.*$", "", line).strip()  # a trailing comment
      if line and not line.startswith("#"):
        commands.append(re.sub(r"\s+", " ", line))
  return commands


def split_and(command: str) -> list[str]:
  """`a && b` -> ['a', 'b'] (an && inside quotes stays)."""
  parts, current, quote = [], "", None
  i = 0
  while i < len(command):
    c = command[i]
    if quote:
      quote = None if c == quote else quote
    elif c in "'\"":
      quote = c
    elif command.startswith("&&", i):
      parts.append(current.strip())
      current, i = "", i + 2
      continue
    current += c
    i += 1
  return parts + [current.strip()]


def not_run_reason(command: str) -> str | None:
  parts = split_and(command)
  runnable = [p for p in parts if not any(p.startswith(n) for n in NOT_RUN)]
  if runnable:
    return None
  return "; ".join(next(r for n, r in NOT_RUN.items() if p.startswith(n)) for p in parts)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


# ------------------------------------------------------------------------------------ fixtures
def _glue(root: str, words: list[str]) -> str:
  rng = random.Random(0)
  sst = os.path.join(root, "SST-2")
  os.makedirs(sst)
  for split, n in (("train", 32), ("dev", 8)):
    with open(os.path.join(sst, f"{split}.tsv"), "w") as f:
      f.write("sentence\tlabel\n")
      for _ in range(n):
        f.write(f"{' '.join(rng.sample(words, 5))}\t{rng.randint(0, 1)}\n")
  mnli = os.path.join(root, "MNLI")
  os.makedirs(mnli)
  header = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
            "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label\n")
  for split, n in (("train", 32), ("dev_matched", 8), ("dev_mismatched", 8)):
    with open(os.path.join(mnli, f"{split}.tsv"), "w") as f:
      f.write(header)
      for i in range(n):
        a, b = " ".join(rng.sample(words, 4)), " ".join(rng.sample(words, 4))
        label = rng.choice(("entailment", "neutral", "contradiction"))
        f.write(f"{i}\t{i}\t{i}\tmain\t-\t-\t-\t-\t{a}\t{b}\t{label}\t{label}\n")
  return root


def _squad(root: str, words: list[str]) -> str:
  rng = random.Random(1)
  os.makedirs(root)
  for split, n in (("train", 16), ("dev", 4)):
    paragraphs = []
    for i in range(n):
      context = " ".join(rng.sample(words, 12))
      answer = context.split()[rng.randint(0, 11)]
      paragraphs.append({"context": context, "qas": [{
          "id": f"{split}{i}", "question": f"where is {answer}",
          "answers": [{"text": answer, "answer_start": context.index(answer)}]}]})
    data = {"version": "1.1", "data": [{"title": "t", "paragraphs": paragraphs}]}
    with open(os.path.join(root, f"{split}-v1.1.json"), "w") as f:
      json.dump(data, f)
  return root


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
  """A temporary checkout (links to the repo's files) and the folders the README names."""
  root = tmp_path_factory.mktemp("readme")
  work = root / "checkout"
  work.mkdir()
  for name in CHECKOUT_ENTRIES:
    os.symlink(os.path.join(REPO, name), work / name)
  from transformers import BertForMaskedLM  # test reference only
  hf = str(root / "models" / "bert-base-uncased")
  hf_fixtures.save_hf(BertForMaskedLM(hf_fixtures.bert_config()), hf)
  from transformers import GPT2LMHeadModel  # test reference only
  hf_causal_fixtures.save_hf(GPT2LMHeadModel, hf_causal_fixtures.gpt2_config(n_positions=64),
                             str(root / "models" / "gpt2"))
  words = [w for w in hf_fixtures.WORDS]
  _glue(str(root / "data" / "glue"), words)
  _squad(str(root / "data" / "squad"), words)
  rng = random.Random(2)
  # Text: /data/wiki and /data/books (documents of sentences), WikiText-103's raw files.
  for folder, names in (("wiki", ("part0.txt", "part1.txt")), ("books", ("part0.txt",)),
                        ("wikitext-103", ("wiki.valid.raw", "wiki.test.raw")),
                        ("new", ("facts.txt",))):
    (root / "data" / folder).mkdir(parents=True)
    for name in names:
      docs = ["\n".join(" ".join(rng.sample(words, 8)) + "." for _ in range(4))
              for _ in range(6)]
      (root / "data" / folder / name).write_text("\n\n".join(docs) + "\n")
  return {"root": str(root), "work": str(work)}


def substitute(command: str, root: str) -> str:
  for prefix in ("/ckpt/", "/data/", "/models/", "/mnt/", "/tmp/run"):
    command = re.sub(rf"(?<![\w.]){re.escape(prefix)}", root + prefix, command)
  return command


def plan(command: str, root: str) -> tuple[list[list[str]], dict[str, str]]:
  """The argv lists to run for a README command (several for '&&'), and extra environment."""
  env = {"HOST0": "localhost", "NUM_HOSTS": "1", "RANK": "0"}
  runs = []
  for part in split_and(command):
    if any(part.startswith(n) for n in NOT_RUN):
      continue
    argv = shlex.split(substitute(part, root))
    argv = [re.sub(r"\$(\w+)", lambda m: env.get(m.group(1), m.group(0)), a) for a in argv]
    if argv[0] in ("python", ".venv/bin/python"):
      argv[0] = sys.executable
    script = argv[1] if argv[0] == sys.executable else argv[0]
    text = " ".join(argv)
    config = re.search(r"--config[ =](\S+)", text)
    config = config.group(1) if config else "configs/default.py"
    if script == "train.py":
      extra = TINY_TRAIN
      if "bert_" in config:
        extra += " --config.data.vocab_size=300"
        if "--config.init.pretrained" not in text:
          extra += " " + TINY_BERT
        else:
          extra += " --config.memory.layers=(0,1)"
        if "pod" in config:
          extra += " --config.model.dtype=float32"  # bf16 on a CPU is slow, not different
      elif "causal_resm_init" in config:  # sizes are the pretrained model's (2 layers)
        extra += " --config.memory.layers=(0,1)"
      elif "sparse_memory" in config:  # TINY_TRAIN's memory has 8**2 slots
        extra += " --config.finetune.top_t=16 --config.finetune.background_batches=2"
      if "--coordinator_address" in text:
        argv = [a.replace(":12345", f":{free_port()}") for a in argv]
      argv += shlex.split(extra)
    elif script == "eval.py" and "configs/" in config and ("glue" in config or "squad" in config):
      argv += shlex.split(TINY_FINETUNE + (" " + TINY_SQUAD if "squad" in config else ""))
    elif argv[1:3] == ["-m", "pkm_jax.data.prepare"]:
      argv += ["--max_len=32"]  # TINY_TRAIN's data.max_len
    elif script == "benchmarks/memory_layer.py":
      argv += ["--tiny", "--out", f"{root}/memory_layer.json"]
    elif script == "benchmarks/throughput.py":
      argv += shlex.split("--hidden 32 --layers 2 --heads 2 --intermediate 64 --vocab 200 "
                          "--n_keys 8 --mem_heads 2 --k 4 --k_dim 16 --batch 2 --seq 16 "
                          f"--steps 1 --warmup 1 --out {root}/throughput")
    runs.append(argv)
  return runs, env


def test_every_readme_command_is_run(checkout):
  commands = readme_commands()
  assert len(commands) >= 20, commands
  for command in commands:
    runs, _ = plan(command, checkout["root"])
    assert runs or not_run_reason(command), f"README command not run by any test: {command}"


def _run(argv, cwd, env, timeout=600):
  full_env = {**os.environ, **env}
  # As a user runs it: the real device count (LLVM's passes skipped, as in conftest: speed only).
  full_env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
  if "mesh.model=8" in " ".join(argv) or "bert_large_resm_pod" in " ".join(argv):
    full_env["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
  return subprocess.run(argv, cwd=cwd, env=full_env, capture_output=True, text=True,
                        timeout=timeout)


def _tensorboard(argv, cwd):
  """`tensorboard --logdir workdirs` serves the runs: started, asked for its runs, stopped."""
  exe = os.path.join(os.path.dirname(sys.executable), "tensorboard")
  port = free_port()
  # Its log goes to a file: an unread pipe can fill and block it. Its teardown once timed out
  # under the full suite's load, so SIGINT is followed by a kill.
  with open(os.path.join(cwd, "tensorboard.log"), "w+") as log:
    proc = subprocess.Popen([exe, *argv[1:], f"--port={port}"], cwd=cwd, stdout=log,
                            stderr=subprocess.STDOUT, text=True)
    try:
      deadline = time.time() + 120
      while time.time() < deadline:
        try:
          with urllib.request.urlopen(f"http://localhost:{port}/data/runs", timeout=5) as r:
            runs = json.load(r)
          if runs:
            return runs
        except OSError:
          pass
        if proc.poll() is not None:
          log.seek(0)
          raise AssertionError(log.read())
        time.sleep(1)
      raise AssertionError("tensorboard did not serve the runs within 120 s")
    finally:
      proc.send_signal(signal.SIGINT)
      try:
        proc.wait(timeout=30)
      except subprocess.TimeoutExpired:  # serving the runs is what is checked, not a quick exit
        proc.kill()
        proc.wait()


def _pip_install_editable(work: str, root: str):
  """`pip install -e .` in a fresh virtual environment (requirements from this one)."""
  venv = os.path.join(root, "venv")
  subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", venv], check=True)
  src = os.path.join(root, "src")
  shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".venv", ".git", "workdirs",
                                                           "__pycache__", "*.egg-info"))
  proc = subprocess.run([os.path.join(venv, "bin", "pip"), "install", "-q", "-e", "."], cwd=src,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  where = subprocess.run([os.path.join(venv, "bin", "python"), "-c",
                          "import pkm_jax.trainer, pkm_jax; print(pkm_jax.__file__)"],
                         cwd=root, capture_output=True, text=True, timeout=300)
  assert where.returncode == 0, where.stderr[-2000:]
  assert where.stdout.strip().startswith(src)


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
  """The environment of the README's gs:// commands: fake-gcs-server serving README_BUCKET."""
  try:
    with gcs_emulator.emulator(str(tmp_path_factory.mktemp("gcs")), (README_BUCKET,)) as (_, env):
      yield env
  except gcs_emulator.Unavailable as e:
    pytest.skip(str(e))


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command(checkout, command, request):
  reason = not_run_reason(command)
  if reason:
    pytest.skip(reason)
  runs, env = plan(command, checkout["root"])
  if f"gs://{README_BUCKET}/" in command:  # started only when a command needs it
    env = {**env, **request.getfixturevalue("bucket")}
  for argv in runs:
    if argv[0] == "tensorboard":
      if not os.path.isdir(os.path.join(checkout["work"], "workdirs", "default")):
        # Run alone (not after the README's `python train.py` in this module): make that run.
        (train,), _ = plan("python train.py", checkout["root"])
        proc = _run(train, checkout["work"], env)
        assert proc.returncode == 0, proc.stderr[-3000:]
      assert "default" in " ".join(_tensorboard(argv, checkout["work"]))
      continue
    if argv[:3] == ["pip", "install", "-e"]:
      _pip_install_editable(checkout["work"], checkout["root"])
      continue
    proc = _run(argv, checkout["work"], env)
    assert proc.returncode == 0, f"{' '.join(argv)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr
