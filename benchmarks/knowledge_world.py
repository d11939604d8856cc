"""World B for the knowledge benchmark: facts that world A (pkm_jax/data/corpus.py) never stated.

B holds two kinds of facts:
- new people: names made by corpus.py's own name generator (`generate_world` with another seed,
  names that A already has dropped), so they are built from the syllables A's text is made of;
  every attribute refers to A's cities / companies / word lists;
- changed attributes of old people: `changes_per_entity` of (lives_in, employer, profession,
  instrument) of some of A's people get a new value.
B's text is written by corpus.py's writer with the TRAINING templates; B's questions (and the
A-probe's) use the HELD-OUT templates, which no training document contains. The A-probe is a
sample of A's facts whose subject B never mentions: what fine-tuning on B should not erase.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any, Sequence

from pkm_jax.data import corpus

CHANGEABLE = ("lives_in", "employer", "profession", "instrument")


@dataclasses.dataclass(frozen=True)
class Question:
  """A statement whose object is what is asked: text[start:end] == answer."""

  text: str
  start: int
  end: int
  subject: str
  relation: str
  answer: str


@dataclasses.dataclass(frozen=True)
class Knowledge:
  world_a: corpus.World
  world_b: corpus.World  # new people (every relation) and old people (changed relations only)
  new_people: tuple[str, ...]
  changed: tuple[tuple[str, str, str, str], ...]  # (subject, relation, old object, new object)
  probe_a: tuple[tuple[str, str, str], ...]  # A's (subject, relation, object) held out of B
  b_docs: tuple[corpus.Document, ...]
  questions_b: tuple[Question, ...]  # held-out templates
  questions_a: tuple[Question, ...]
  questions_b_train: tuple[Question, ...]  # training templates
  questions_a_train: tuple[Question, ...]


def question(subject: str, relation: str, obj: str, template: str) -> Question:
  """`template` (a corpus.TEMPLATES phrasing) filled in, naming the subject, with the object's
  character span."""
  article = "an" if obj[0] in "aeiou" else "a"
  pre, post = template.replace("{a_o}", article + " {o}").split("{o}")
  fill = dict(s=subject, poss=subject + "'s")
  pre, post = pre.format(**fill), post.format(**fill)
  text = pre + obj + post
  text = text[0].upper() + text[1:]
  return Question(text, len(pre), len(pre) + len(obj), subject, relation, obj)


def template_questions(world: corpus.World, facts: Sequence[tuple[str, str, str]],
                       held_out: bool = True) -> tuple[Question, ...]:
  """One question per (fact, template of its relation): the held-out templates (phrasings no
  training document has), or the training ones (`held_out=False`: the text's own phrasings)."""
  out = []
  for s, r, o in facts:
    for template in corpus.TEMPLATES[(world.kinds[s], r)][0 if not held_out else 1]:
      out.append(question(s, r, o, template))
  return tuple(out)


def _new_names(world_a: corpus.World, n: int, seed: int) -> list[str]:
  """`n` people's names from corpus.py's generator (another world's seed), none of them A's."""
  names: list[str] = []
  taken = set(world_a.kinds)
  attempt = 0
  while len(names) < n:
    # random.Random takes a string seed: another world, reproducibly.
    other = corpus.generate_world(max(40, 2 * n), f"B/{seed}/{attempt}")  # type: ignore
    for name, kind in other.kinds.items():
      # A person whose surname or first name is an A entity's name would read as that entity.
      if kind == "person" and name not in taken and not set(name.split()) & taken:
        names.append(name)
        taken.add(name)
        if len(names) == n:
          break
    attempt += 1
  return names


def make_knowledge(num_entities: int, world_seed: int, *, new_people: int, changed_people: int,
                   changes_per_entity: int, probe_facts: int, docs_per_entity: int,
                   seed: int = 0) -> Knowledge:
  """World A (generate_world(num_entities, world_seed)), world B and its documents, questions.

  Deterministic in its arguments (Python's random.Random with string seeds).
  """
  world_a = corpus.generate_world(num_entities, world_seed)
  rng = random.Random(f"knowledge/{world_seed}/{seed}")
  kinds_a = world_a.kinds
  cities = sorted(e for e, k in kinds_a.items() if k == "city")
  companies = sorted(e for e, k in kinds_a.items() if k == "company")
  people_a = sorted(e for e, k in kinds_a.items() if k == "person")
  if changed_people > len(people_a) // 2:
    raise ValueError(f"changed_people={changed_people}: world A has only {len(people_a)} people")

  kinds: dict[str, str] = {}
  attrs: dict[str, dict[str, str]] = {}
  pronouns: dict[str, tuple[str, str]] = {}
  names = _new_names(world_a, new_people, seed=world_seed * 1000 + seed)
  for p in names:
    kinds[p], pronouns[p] = "person", rng.choice((("he", "his"), ("she", "her")))
    attrs[p] = dict(born_in=rng.choice(cities), birth_year=str(rng.randint(1900, 1999)),
                    profession=rng.choice(corpus.PROFESSIONS), employer=rng.choice(companies),
                    food=rng.choice(corpus.FOODS), instrument=rng.choice(corpus.INSTRUMENTS),
                    lives_in=rng.choice(cities))
  pools = {"lives_in": cities, "employer": companies, "profession": corpus.PROFESSIONS,
           "instrument": corpus.INSTRUMENTS}
  shuffled = people_a[:]
  rng.shuffle(shuffled)
  changed = []
  for p in shuffled[:changed_people]:
    kinds[p], pronouns[p], attrs[p] = "person", world_a.pronouns[p], {}
    for r in rng.sample(CHANGEABLE, changes_per_entity):
      old = world_a.attributes[p][r]
      new = rng.choice([v for v in pools[r] if v != old])
      attrs[p][r] = new
      changed.append((p, r, old, new))
  world_b = corpus.World(kinds=kinds, attributes=attrs, pronouns=pronouns)

  # The A-probe: facts of A's entities that B never names as a subject (A's people not changed,
  # and A's cities, companies and countries).
  untouched = [f for f in world_a.facts() if f[0] not in kinds]
  probe = rng.sample(untouched, min(probe_facts, len(untouched)))

  # B's text: every B subject gets docs_per_entity documents, in freshly shuffled rounds.
  # The writer indexes every person's birthplace and employer when built, so it is built on
  # B's subjects with all their (A-updated) attributes, then writes from B's facts alone: an
  # old person's document states only what changed.
  full = {p: {**world_a.attributes.get(p, {}), **a} for p, a in attrs.items()}
  make_writer = corpus._Writer  # pylint: disable=protected-access
  writer = make_writer(dataclasses.replace(world_b, attributes=full), rng, held_out=False)
  writer.world = world_b
  writer.unstated = {e: list(a) for e, a in attrs.items()}
  docs = []
  subjects = list(kinds)
  for _ in range(docs_per_entity):
    rng.shuffle(subjects)
    docs += [writer.document(s) for s in subjects]
  return Knowledge(world_a=world_a, world_b=world_b, new_people=tuple(names),
                   changed=tuple(changed), probe_a=tuple(probe), b_docs=tuple(docs),
                   questions_b=template_questions(world_b, world_b.facts()),
                   questions_a=template_questions(world_a, probe),
                   questions_b_train=template_questions(world_b, world_b.facts(), False),
                   questions_a_train=template_questions(world_a, probe, False))


def write_documents(docs: Sequence[corpus.Document], path: str) -> None:
  """Blank-line separated documents, one sentence per line (data.source='files' reads these)."""
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n\n".join("\n".join(doc) for doc in docs) + "\n")


def vocabulary_check(knowledge: Knowledge, tokenizer: Any) -> dict[str, Any]:
  """How A's tokenizer splits B's new names: [UNK] pieces (should be none), pieces per word and
  the share of name words that are whole entries of A's vocabulary."""
  from pkm_jax.data.tokenizer import special_token_ids  # pylint: disable=g-import-not-at-top
  unk = special_token_ids(tokenizer).get("unk")
  words = sorted({w for name in knowledge.new_people for w in name.split()})
  pieces = [tokenizer.encode(w, add_special_tokens=False).ids for w in words]
  return {"new_name_words": len(words),
          "words_with_unk": sum(unk in p for p in pieces) if unk is not None else 0,
          "whole_vocab_words": sum(len(p) == 1 for p in pieces),
          "mean_pieces_per_word": sum(map(len, pieces)) / max(1, len(words))}
