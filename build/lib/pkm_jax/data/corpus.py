"""The embedded default corpus: English-like documents stating facts about a generated world.

No download: `generate_corpus(num_entities, num_docs, seed)` builds a world of people, cities,
companies and countries with pronounceable generated names and fixed attributes (a person's
birthplace, profession, employer, ...), then writes short encyclopedia-style documents that state
those facts with varied sentence templates, pronouns, connective phrases and distractor sentences.
Every fact is stated several times across the training documents, so predicting a masked
attribute ("Talim Borsk was born in [MASK]") needs memorised knowledge rather than local syntax:
the regime in which a memory layer's extra capacity should show.

The held-out documents are written from a separate random stream about the same world, mostly
with templates and connectives that never occur in training: held-out MLM then measures recall of
memorised facts, not of memorised sentences. Everything is a deterministic function of the seed
(Python's `random.Random`, whose integer-seeded draws are stable across platforms).
"""

from __future__ import annotations

import dataclasses
import random

Document = tuple[str, ...]  # one document = its sentences, in order

# (subject kind, relation) -> (training templates, held-out-only templates).
# {s}: the subject (name, or a pronoun if the template starts with it); {poss}: its possessive;
# {o}: the object; {a_o}: the object with "a"/"an".
TEMPLATES: dict[tuple[str, str], tuple[tuple[str, ...], tuple[str, ...]]] = {
    ("person", "born_in"): (
        ("{s} was born in {o}.", "{s} was born in the city of {o}.",
         "the birthplace of {s} is {o}.", "{poss} family comes from {o}, where {s} was born."),
        ("{o} is the city where {s} was born.", "{s} is a native of {o}.")),
    ("person", "birth_year"): (
        ("{s} was born in {o}.", "{s} was born in the year {o}.", "{poss} year of birth is {o}."),
        ("{s} came into the world in {o}.", "the year {s} was born was {o}.")),
    ("person", "profession"): (
        ("{s} works as {a_o}.", "{s} is {a_o} by profession.", "{poss} job is that of {a_o}."),
        ("{s} earns a living as {a_o}.", "by trade, {s} is {a_o}.")),
    ("person", "employer"): (
        ("{s} works for {o}.", "{s} is employed by {o}.", "{poss} employer is {o}."),
        ("{s} has a job at {o}.", "{o} employs {s}.")),
    ("person", "food"): (
        ("{poss} favourite food is {o}.", "{s} loves eating {o}.",
         "{s} likes {o} more than any other food."),
        ("the food {s} likes best is {o}.", "no dish pleases {s} more than {o}.")),
    ("person", "instrument"): (
        ("{s} plays the {o}.", "{poss} favourite instrument is the {o}.",
         "{s} has played the {o} since childhood."),
        ("{s} is a keen {o} player.", "the instrument {s} plays is the {o}.")),
    ("person", "lives_in"): (
        ("{s} lives in {o}.", "{s} now lives in {o}.", "{poss} home is in {o}."),
        ("{s} has settled in {o}.", "these days {s} resides in {o}.")),
    ("city", "country"): (
        ("{s} is a city in {o}.", "{s} lies in {o}.", "{s} is located in {o}."),
        ("{o} is the country where {s} is found.", "{s} belongs to {o}.")),
    ("city", "river"): (
        ("{s} stands on {o}.", "{o} flows through {s}.", "{s} is built along {o}."),
        ("{s} sits on the banks of {o}.", "{o} runs through {s}.")),
    ("city", "population"): (
        ("{s} has about {o} thousand inhabitants.", "about {o} thousand people live in {s}.",
         "the population of {s} is about {o} thousand."),
        ("{s} is home to roughly {o} thousand people.", "roughly {o} thousand residents live "
         "in {s}.")),
    ("company", "founder"): (
        ("{s} was founded by {o}.", "{o} founded {s}.", "the founder of {s} is {o}."),
        ("{o} started {s}.", "{s} was started by {o}.")),
    ("company", "headquarters"): (
        ("{s} is headquartered in {o}.", "{poss} headquarters are in {o}.",
         "{s} has its main office in {o}."),
        ("the head office of {s} is in {o}.", "{s} is based in {o}.")),
    ("company", "founded_year"): (
        ("{s} was founded in {o}.", "{s} was established in {o}."),
        ("{s} opened for business in {o}.", "since {o}, {s} has been in business.")),
    ("company", "industry"): (
        ("{s} is {a_o} company.", "{s} works in {o}.", "{s} makes its money in {o}."),
        ("{s} operates in the {o} industry.", "the business of {s} is {o}.")),
    ("country", "capital"): (
        ("the capital of {s} is {o}.", "{o} is the capital of {s}.", "{poss} capital city is {o}."),
        ("{s} is governed from {o}, its capital.", "{o} serves as the capital of {s}.")),
    ("country", "language"): (
        ("people in {s} speak {o}.", "the language of {s} is {o}.", "{o} is spoken in {s}."),
        ("{s} uses {o} as its main language.", "most people in {s} talk in {o}.")),
    ("country", "currency"): (
        ("the currency of {s} is the {o}.", "people in {s} pay with the {o}.",
         "{s} uses the {o} as its money."),
        ("shops in {s} take the {o}.", "the money used in {s} is the {o}.")),
}

# Reverse statements in a city / company / country document: (train, held-out) with {o1}, {o2}.
REVERSE_TEMPLATES = {
    "city": (("famous people born in {s} include {o1} and {o2}.",
              "{o1} and {o2} were both born in {s}."),
             ("{s} is the birthplace of {o1} and {o2}.",)),
    "company": (("{o1} and {o2} both work for {s}.", "among the staff of {s} are {o1} and {o2}."),
                ("{s} employs {o1} as well as {o2}.",)),
    "country": (("cities in {s} include {o1} and {o2}.", "{o1} and {o2} are cities in {s}."),
                ("{s} contains the cities of {o1} and {o2}.",)),
}

PREFIXES = (("according to local records, ", "as many people know, ", "in fact, ",
             "it is said that ", "some sources note that ", "interestingly, "),
            ("official documents confirm that ", "as it happens, ", "it is well known that "))

DISTRACTORS = (
    "little else is known about those early years.", "the details are still discussed today.",
    "many stories are told about this.", "not everyone agrees on what happened next.",
    "this is often mentioned in local guides.", "records from that time are incomplete.",
    "it is a well known story.", "visitors often ask about it.",
    "the weather that year was unusually mild.", "few people outside the region had heard of it.",
    "{name} is mentioned in several old letters.", "a short film was once made about {name}.",
    "some of this information comes from a newspaper article.",
    "the rest of the story is less certain.")

PROFESSIONS = ("accountant", "architect", "astronomer", "baker", "botanist", "carpenter",
               "chemist", "dentist", "economist", "electrician", "engineer", "farmer",
               "geologist", "historian", "journalist", "lawyer", "librarian", "mechanic", "nurse",
               "painter", "pharmacist", "photographer", "pilot", "plumber", "poet", "sculptor",
               "surgeon", "tailor", "teacher", "translator")
FOODS = ("apples", "bread", "cheese", "chocolate", "curry", "dumplings", "figs", "honey",
         "lentils", "mangoes", "noodles", "olives", "pancakes", "pears", "plums", "rice",
         "salmon", "soup", "stew", "tomatoes", "walnuts", "yogurt", "carrots", "peaches")
INSTRUMENTS = ("piano", "violin", "cello", "flute", "guitar", "harp", "trumpet", "drums",
               "clarinet", "oboe", "banjo", "accordion", "saxophone", "trombone", "mandolin",
               "viola", "bassoon", "harmonica")
INDUSTRIES = ("shipping", "banking", "software", "textiles", "mining", "publishing",
              "furniture", "toys", "medicine", "chemicals", "aviation", "agriculture",
              "insurance", "glassware", "electronics")

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr",
           "gr", "kr", "st", "th", "sh", "ch", "tr", "pl", "j", "h", "")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ea", "ou", "ie")
_CODAS = ("", "", "", "", "n", "r", "l", "s", "m", "k", "th", "nd", "rt")
_SUFFIX = {"city": ("", "", "", "ton", "burg", "ville", "port", "dale"),
           "country": ("", "ia", "land", "stan", "ia"),
           "company": (" Corporation", " Group", " Company", " Holdings", " Partners", " Limited")}


@dataclasses.dataclass(frozen=True)
class World:
  """The generated facts. `attributes[name][relation]` is the object (a name or a word)."""

  kinds: dict[str, str]  # entity name -> 'person' | 'city' | 'company' | 'country'
  attributes: dict[str, dict[str, str]]
  pronouns: dict[str, tuple[str, str]]  # name -> (subject pronoun, possessive)

  def facts(self) -> list[tuple[str, str, str]]:
    """All (subject, relation, object) triples."""
    return [(s, r, o) for s, rel in self.attributes.items() for r, o in rel.items()]


@dataclasses.dataclass(frozen=True)
class GeneratedCorpus:
  world: World
  train: list[Document]
  eval: list[Document]


def _word(rng: random.Random, syllables: int) -> str:
  return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                 for _ in range(syllables))


def _unique(rng: random.Random, used: set[str], make) -> str:
  while True:
    name = make()
    if name not in used and len(name) > 2:
      used.add(name)
      return name


def generate_world(num_entities: int, seed: int) -> World:
  """People, cities, companies and countries (about 75/12/10/3 %) with random attributes."""
  if num_entities < 20:
    raise ValueError(f"data.generated.num_entities={num_entities} is too small (need >= 20)")
  rng = random.Random(seed)
  used: set[str] = set()
  n_countries = max(3, num_entities // 33)
  n_cities = max(6, num_entities // 8)
  n_companies = max(4, num_entities // 10)
  n_people = num_entities - n_countries - n_cities - n_companies

  def place(kind):
    return lambda: (_word(rng, rng.randint(1, 2)) + rng.choice(_SUFFIX[kind])).capitalize()

  countries = [_unique(rng, used, place("country")) for _ in range(n_countries)]
  cities = [_unique(rng, used, place("city")) for _ in range(n_cities)]
  companies = [_unique(rng, used, lambda: _word(rng, 2).capitalize() + rng.choice(
      _SUFFIX["company"])) for _ in range(n_companies)]
  first_names = [_word(rng, 2).capitalize() for _ in range(max(20, n_people // 4))]
  people = [_unique(rng, used, lambda: rng.choice(first_names) + " " +
                    _word(rng, rng.randint(2, 3)).capitalize()) for _ in range(n_people)]
  rivers = [f"the {_word(rng, 2).capitalize()} River" for _ in range(max(4, n_cities // 3))]

  kinds: dict[str, str] = {}
  attrs: dict[str, dict[str, str]] = {}
  pronouns: dict[str, tuple[str, str]] = {}
  city_country = {c: countries[i % n_countries] if i < n_countries else rng.choice(countries)
                  for i, c in enumerate(cities)}  # every country gets at least one city
  for c in countries:
    kinds[c], pronouns[c] = "country", ("it", "its")
    attrs[c] = dict(capital=rng.choice([x for x in cities if city_country[x] == c]),
                    language=_word(rng, 2).capitalize() + rng.choice(("ish", "ese", "ic", "i")),
                    currency=_word(rng, 2))
  for c in cities:
    kinds[c], pronouns[c] = "city", ("it", "its")
    attrs[c] = dict(country=city_country[c], river=rng.choice(rivers),
                    population=str(rng.randint(5, 950)))
  for c in companies:
    kinds[c], pronouns[c] = "company", ("it", "its")
    attrs[c] = dict(founder=rng.choice(people), headquarters=rng.choice(cities),
                    founded_year=str(rng.randint(1850, 1990)), industry=rng.choice(INDUSTRIES))
  for p in people:
    kinds[p], pronouns[p] = "person", rng.choice((("he", "his"), ("she", "her")))
    attrs[p] = dict(born_in=rng.choice(cities), birth_year=str(rng.randint(1900, 1999)),
                    profession=rng.choice(PROFESSIONS), employer=rng.choice(companies),
                    food=rng.choice(FOODS), instrument=rng.choice(INSTRUMENTS),
                    lives_in=rng.choice(cities))
  return World(kinds=kinds, attributes=attrs, pronouns=pronouns)


class _Writer:
  """Writes documents about a world; `held_out` switches to the held-out template pools."""

  def __init__(self, world: World, rng: random.Random, held_out: bool):
    self.world, self.rng, self.held_out = world, rng, held_out
    self.unstated: dict[str, list[str]] = {e: list(a) for e, a in world.attributes.items()}
    self.reverse: dict[tuple[str, str], list[str]] = {}  # (kind, object) -> subjects
    for s, rel in world.attributes.items():
      if world.kinds[s] == "person":
        self.reverse.setdefault(("city", rel["born_in"]), []).append(s)
        self.reverse.setdefault(("company", rel["employer"]), []).append(s)
      elif world.kinds[s] == "city":
        self.reverse.setdefault(("country", rel["country"]), []).append(s)

  def _template(self, pools: tuple[tuple[str, ...], tuple[str, ...]]) -> str:
    train, held = pools
    if self.held_out and self.rng.random() < 0.7:
      return self.rng.choice(held)
    return self.rng.choice(train)

  def _finish(self, text: str) -> str:
    rng = self.rng
    if rng.random() < 0.15:
      pool = PREFIXES[0] + (PREFIXES[1] if self.held_out else ())
      text = rng.choice(pool) + text
    return text[0].upper() + text[1:]

  def fact(self, subject: str, relation: str, allow_pronoun: bool) -> str:
    kind = self.world.kinds[subject]
    template = self._template(TEMPLATES[(kind, relation)])
    obj = self.world.attributes[subject][relation]
    pron, poss = self.world.pronouns[subject]
    # A pronoun only as the sentence's grammatical subject ("he", "his"), never mid-sentence.
    use_pronoun = allow_pronoun and template.startswith(("{s}", "{poss}")) and (
        self.rng.random() < 0.5)
    s = pron if use_pronoun else subject
    possessive = poss if use_pronoun else subject + "'s"
    article = "an" if obj[0] in "aeiou" else "a"
    return self._finish(template.format(s=s, poss=possessive, o=obj, a_o=f"{article} {obj}"))

  def document(self, subject: str) -> Document:
    rng, world = self.rng, self.world
    relations = list(world.attributes[subject])
    rng.shuffle(relations)
    # Training documents state an entity's not-yet-stated facts first, so that after a couple
    # of documents per entity every fact has been seen at least once.
    todo = self.unstated[subject]
    if not self.held_out and todo:
      relations.sort(key=lambda r: r not in todo)
    count = rng.randint(min(3, len(relations)), len(relations))
    chosen = relations[:count]
    if not self.held_out:
      self.unstated[subject] = [r for r in todo if r not in chosen]
    sentences = [self.fact(subject, r, allow_pronoun=i > 0) for i, r in enumerate(chosen)]

    if rng.random() < 0.5:  # one fact about a related entity, by name
      related = [o for o in world.attributes[subject].values() if o in world.kinds]
      if related:
        other = rng.choice(related)
        sentences.append(self.fact(other, rng.choice(list(world.attributes[other])), False))
    kind = world.kinds[subject]
    members = self.reverse.get((kind, subject), [])
    if kind in REVERSE_TEMPLATES and len(members) >= 2 and rng.random() < 0.5:
      o1, o2 = rng.sample(members, 2)
      template = self._template(REVERSE_TEMPLATES[kind])
      sentences.append(self._finish(template.format(s=subject, o1=o1, o2=o2)))
    for _ in range(rng.choice((0, 0, 1, 1, 2))):
      text = rng.choice(DISTRACTORS).format(name=subject)
      sentences.insert(rng.randint(1, len(sentences)), text[0].upper() + text[1:])
    return tuple(sentences)


def generate_corpus(num_entities: int, num_docs: int, seed: int,
                    num_eval_docs: int | None = None) -> GeneratedCorpus:
  """A world, `num_docs` training documents and held-out documents (default 5% as many).

  Training documents cycle through the entities in freshly shuffled order, so every entity gets
  num_docs / num_entities documents; held-out documents pick their subjects at random.
  """
  if num_docs < 1:
    raise ValueError(f"data.generated.num_docs={num_docs} must be positive")
  world = generate_world(num_entities, seed)
  entities = list(world.kinds)
  train_rng = random.Random(f"{seed}/train")
  writer = _Writer(world, train_rng, held_out=False)
  order: list[str] = []
  train = []
  for _ in range(num_docs):
    if not order:
      order = entities[:]
      train_rng.shuffle(order)
    train.append(writer.document(order.pop()))

  if num_eval_docs is None:
    num_eval_docs = max(1, round(0.05 * num_docs))
  eval_rng = random.Random(f"{seed}/eval")
  eval_writer = _Writer(world, eval_rng, held_out=True)
  train_set = set(train)
  held: list[Document] = []
  while len(held) < num_eval_docs:
    doc = eval_writer.document(eval_rng.choice(entities))
    if doc not in train_set:  # held-out documents are never verbatim training documents
      held.append(doc)
  return GeneratedCorpus(world=world, train=train, eval=held)
