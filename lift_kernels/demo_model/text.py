"""Synthetic text for the embedded demo: the vocabulary, the pretraining corpus and the demo
document, all generated from seeded random draws (nothing is downloaded).

Three kinds of sentence make up every text:

* filler: short random sentences about places and things ("the quiet river passes the old
  mill ."), the haystack (the demo document's filler names no city);
* facts: "the access code of the <city> <place> is <code> ." with a 4-digit code, which the
  word-level tokenizer splits into two digit-pair tokens ("72", "94").  In the pretraining
  corpus every code starts with its city's own digit pair (CITY_PREFIX, like an area code):
  predicting it forces the base to carry the city into the position that predicts the
  code, where Gated Memory reads its query.  The demo's needles break that rule;
* in the pretraining corpus only, restatements of facts stated earlier in the same sequence
  (a copy lesson: a restated code can be copied from the context).

The pretraining generator never emits a demo needle (see ``pretraining_sequence``).
"""

from __future__ import annotations

import random

CITIES = (
    "lisbon oslo kyoto lima cairo dakar quito hanoi riga tunis sofia perth vienna prague "
    "madrid paris berlin rome athens dublin london warsaw minsk kiev ankara tehran kabul "
    "delhi dhaka manila jakarta seoul tokyo osaka beijing shanghai taipei sydney auckland "
    "denver boston chicago houston seattle toronto montreal havana bogota caracas santiago "
    "bern zurich geneva milan naples venice turin porto seville valencia lyon nice marseille "
    "bordeaux hamburg munich cologne bremen leipzig dresden krakow gdansk tallinn vilnius "
    "helsinki bergen malmo aarhus odense york leeds bristol glasgow belfast cork galway "
    "nairobi accra lagos luanda harare lusaka durban muscat doha amman beirut baku yerevan "
    "tbilisi almaty tashkent bishkek lhasa kathmandu colombo karachi lahore mumbai chennai "
    "hobart darwin cairns napier nelson"
).split()

PLACES = "vault bank archive tower museum station library harbor depot bunker".split()

ADJECTIVES = (
    "old quiet small large green red dark bright cold warm narrow wide busy empty ancient "
    "new tall low distant hidden"
).split()

NOUNS = (
    "river mill bridge market road garden house forest hill church square wall gate field "
    "farm boat school castle tree lake street park shop valley"
).split()

PEOPLE = "farmer baker sailor teacher doctor guard merchant painter child traveler".split()

VERBS = "passes faces crosses follows joins meets leaves reaches watches opens".split()

PEOPLE_VERBS = "visits paints repairs guards finds sells builds cleans".split()

FUNCTION_WORDS = (
    "the a of in near and every morning evening at by from with to is was there one "
    "two three many people came went saw says access code opens travel log cities"
).split()

TIMES = "morning evening night winter summer spring autumn".split()

SPECIAL_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>"]
PUNCTUATION = [".", ",", "..."]
DIGIT_PAIRS = [f"{i:02d}" for i in range(100)]
DIGITS = [str(i) for i in range(10)]


def vocabulary() -> list[str]:
    """Every token of the demo's word-level tokenizer, in id order (deterministic)."""
    words = []
    for group in (SPECIAL_TOKENS, PUNCTUATION, DIGIT_PAIRS, DIGITS, FUNCTION_WORDS, TIMES,
                  ADJECTIVES, NOUNS, PEOPLE, VERBS, PEOPLE_VERBS, PLACES, CITIES):
        words += [w for w in group if w not in words]
    return words


CITY_FREE_FORMS = (0, 2, 5)


def filler_sentence(rng: random.Random, forms=range(6)) -> str:
    """One random haystack sentence of one of ``forms`` (CITY_FREE_FORMS name no city)."""
    a, n, c = rng.choice, rng.choice, rng.choice
    form = rng.choice(forms)
    if form == 0:
        return f"the {a(ADJECTIVES)} {n(NOUNS)} {c(VERBS)} the {a(ADJECTIVES)} {n(NOUNS)} ."
    if form == 1:
        return f"in {c(CITIES)} , the {n(PEOPLE)} {c(PEOPLE_VERBS)} the {a(ADJECTIVES)} {n(NOUNS)} ."
    if form == 2:
        return f"every {c(TIMES)} the {n(PEOPLE)} {c(PEOPLE_VERBS)} a {n(NOUNS)} near the {n(NOUNS)} ."
    if form == 3:
        return f"there was a {a(ADJECTIVES)} {n(NOUNS)} in {c(CITIES)} by the {n(NOUNS)} ."
    if form == 4:
        return f"the {n(PEOPLE)} from {c(CITIES)} {c(PEOPLE_VERBS)} the {c(PLACES)} ."
    return f"many people came to the {a(ADJECTIVES)} {n(NOUNS)} at {c(TIMES)} ."


def fact_prompt(city: str, place: str) -> str:
    """The fact sentence up to its code: the recall prompt."""
    return f"the access code of the {city} {place} is"


def fact_sentence(city: str, place: str, code: str) -> str:
    return f"{fact_prompt(city, place)} {code} ."


def random_code(rng: random.Random) -> str:
    return f"{rng.randrange(1000, 10000)}"


# "World knowledge" of the pretraining corpus: every code of the pretraining corpus starts
# with its city's own digit pair (like an area code).  Predicting it makes the base carry
# the city into the position that predicts the code, which is where Gated Memory reads the
# query.  The demo's needles break the rule (see ``needles``).
_HABIT_RNG = random.Random(7)
CITY_PREFIX = {city: f"{_HABIT_RNG.randrange(10, 100)}" for city in CITIES}


def pretraining_code(rng: random.Random, city: str) -> str:
    return f"{CITY_PREFIX[city]}{rng.randrange(100):02d}"


# The needles of the demo document: (city, place).  Their codes come from DOCUMENT_SEED.
NEEDLE_KEYS = (
    ("lisbon", "vault"), ("oslo", "bank"), ("kyoto", "archive"), ("lima", "tower"),
    ("cairo", "museum"), ("dakar", "station"), ("quito", "library"), ("hanoi", "harbor"),
    ("riga", "depot"), ("tunis", "bunker"), ("sofia", "vault"), ("perth", "bank"),
)
DOCUMENT_SEED = 2026


def needles(seed: int = DOCUMENT_SEED, keys=NEEDLE_KEYS) -> list[tuple[str, str, str]]:
    """The (city, place, code) facts of ``keys`` (the demo's by default).  Codes get distinct
    first digit pairs so that no two needles share the token after "is" (a shared first
    token would make the second one ambiguous for any model that reads only the recent
    tokens), and none starts with its city's pretraining prefix (the base model alone must
    not know any part of it)."""
    rng = random.Random(seed)
    out, firsts = [], set()
    for city, place in keys:
        while True:
            code = random_code(rng)
            if code[:2] not in firsts and code[:2] != CITY_PREFIX[city]:
                break
        firsts.add(code[:2])
        out.append((city, place, code))
    return out


def _compose(rng: random.Random, facts, filler_sentences: int, forms, span, title: str) -> str:
    """``filler_sentences`` haystack sentences of ``forms``, the facts inserted once each at
    random places within the fraction ``span`` (lo, hi) of it, one sentence a line."""
    sentences = [filler_sentence(rng, forms) for _ in range(filler_sentences)]
    lo, hi = int(span[0] * filler_sentences), int(span[1] * filler_sentences)
    slots = sorted(rng.sample(range(lo, hi), len(facts)))
    for offset, (slot, fact) in enumerate(zip(slots, facts)):
        sentences.insert(slot + offset, fact_sentence(*fact))
    return title + " .\n" + "\n".join(sentences) + "\n"


def document(seed: int = DOCUMENT_SEED, filler_sentences: int = 820) -> tuple[str, list]:
    """The demo document: ``filler_sentences`` haystack sentences that name no city, with the
    needles buried in its middle fifth, each once.  Returns (text, needles)."""
    rng = random.Random(seed + 1)
    facts = needles(seed)
    return _compose(rng, facts, filler_sentences, CITY_FREE_FORMS, (0.4, 0.6),
                    "a travel log of many cities"), facts


def other_document(seed: int, num_needles: int = 10,
                   filler_sentences: int = 820) -> tuple[str, list]:
    """A different document of the demo's kind, for testing a recipe's generality: other
    cities and places than the demo's needles (drawn by ``seed``), needles spread over the
    whole document, and another filler mix (the city-free forms plus one form that names a
    city, in seeded proportions).  Returns (text, needles)."""
    rng = random.Random(seed)
    taken = {city for city, _ in NEEDLE_KEYS}
    cities = rng.sample([c for c in CITIES if c not in taken], num_needles)
    keys = [(city, rng.choice(PLACES)) for city in cities]
    facts = needles(seed, keys)
    forms = list(CITY_FREE_FORMS) * rng.randint(2, 4) + [rng.choice((1, 3, 4))]
    return _compose(rng, facts, filler_sentences, forms, (0.02, 0.98),
                    "a travel log of cities"), facts


def pretraining_sequence(rng: random.Random, target_words: int,
                         excluded: frozenset = frozenset()) -> str:
    """One pretraining text of about ``target_words`` tokens: facts stated and later restated
    (the copy lesson; most sentences are facts, so the lesson is dense), between filler.

    ``excluded`` holds (city, place, code) triples never to emit (the demo's needles)."""
    num_facts = rng.randint(4, 12)
    keys = rng.sample([(c, p) for c in CITIES for p in PLACES], num_facts)
    facts = []
    for city, place in keys:
        code = pretraining_code(rng, city)
        while (city, place, code) in excluded:
            code = pretraining_code(rng, city)
        facts.append((city, place, code))
    pending = list(facts)  # not yet stated
    stated = []
    out, words = [], 0
    while words < target_words:
        r = rng.random()
        if pending and r < 0.4:
            fact = pending.pop()
            stated.append(fact)
            sentence = fact_sentence(*fact)
        elif stated and r < 0.8:
            sentence = fact_sentence(*rng.choice(stated))
        else:
            sentence = filler_sentence(rng)
        out.append(sentence)
        words += len(sentence.split()) + 1  # the code is two tokens
    return "\n".join(out)
