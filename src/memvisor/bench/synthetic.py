"""Synthetic but realistic memories for scale benchmarks, generated deterministically from a seed.

What makes them realistic enough to time retrieval honestly:
- several users (`users`, default 200), each with a home city, family and hobbies that recur;
- times spread over two years, increasing per user, with sessions of a few memories each;
- lengths from a few words to a few sentences (log-normal, 4 to about 120 words);
- vocabulary with a Zipf-like tail: a few hundred common words plus tens of thousands of rare
  pseudo-words (product names, pet names, place names) so keyword indexes see realistic postings.
Queries are written from randomly chosen memories (the facts they state, in question form), so
each query has a known source memory (`Query.target`), usable as a sanity check of search quality.
"""
from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass

FIRST = ("Ana Ben Clara David Elif Farah Goran Hana Ivan Jun Kemal Lena Mateo Nadia Omar Priya Quinn "
         "Rosa Sami Tariq Uma Viktor Wen Xavier Yara Zoe Ali Bea Chen Dara Emil Femi Greta Hugo Ines "
         "Jonas Kira Liam Mina Noor").split()
CITIES = ("Lisbon Porto Lyon Osaka Denver Nairobi Krakow Austin Hanoi Quito Perth Leeds Bergen Tunis "
          "Seville Cork Graz Tartu Bilbao Accra Malmo Turin Ghent Brno Split").split()
RELATIONS = "sister brother mother father cousin neighbour colleague friend partner grandmother".split()
HOBBIES = ("pottery climbing violin chess running baking gardening photography surfing knitting "
           "painting cycling yoga birdwatching woodworking salsa sailing hiking archery poetry").split()
VERBS = ("visited started finished bought sold cooked painted fixed planned cancelled booked adopted "
         "learned taught lost found borrowed returned ordered built").split()
OBJECTS = ("a bicycle|a sourdough starter|tickets for a concert|a used car|a new laptop|a puppy|a kayak|"
           "a flat near the river|a tent|a sewing machine|an old piano|a camera lens|a book on history|"
           "running shoes|a garden shed|a pasta machine|a telescope|a drone|a wool sweater|a ukulele").split("|")
COMMON = ("really quite honestly today yesterday later maybe again finally still already because although "
          "while after before during about with without around nearly almost probably weather great "
          "everyone happy longer expected talk next week sure worth money kids loved work busy lately back "
          "hurts train late laughed hours morning evening night weekend month year friends family home "
          "house kitchen garden street market shop school office meeting trip holiday dinner lunch coffee "
          "tea music film book game team match race class lesson teacher doctor bus plane car bike walk "
          "rain snow sun wind cold warm hot tired excited nervous proud worried glad sorry lucky busy "
          "new old big small long short early first last best worst same different other little lot "
          "idea plan problem question answer story photo picture video song letter message call phone "
          "price bill rent job project deadline boss colleague neighbour party wedding birthday gift "
          "present surprise visit stay move leave arrive start finish try remember forget think feel "
          "know want need like love hate help ask tell say show find keep give take bring buy pay").split()
PHRASES = ("the weather was great and everyone seemed happy about it|it took longer than expected|"
           "we should talk about it next week|I am not sure it was worth the money|the kids loved it|"
           "work has been busy lately|my back still hurts a bit|the train was late again|"
           "we laughed about it for hours|I will send the photos later|it was raining the whole time|"
           "nobody expected that|my phone died halfway through").split("|")
SYLLABLES = "ka lo mi ren tor va shi nu bel dra qui zor fen pa lix mo tre gan vi sul".split()
QUESTION_FORMS = ("What did {name} {verb_base} in {city}?", "When did {name} {verb_base} {obj}?",
                  "Who {verb} {obj} in {city}?", "Did {name} ever {verb_base} {obj}?")
_BASE = {"visited": "visit", "started": "start", "finished": "finish", "bought": "buy", "sold": "sell",
         "cooked": "cook", "painted": "paint", "fixed": "fix", "planned": "plan", "cancelled": "cancel",
         "booked": "book", "adopted": "adopt", "learned": "learn", "taught": "teach", "lost": "lose",
         "found": "find", "borrowed": "borrow", "returned": "return", "ordered": "order", "built": "build"}


@dataclass(frozen=True)
class Query:
    text: str
    target: int  # index of the memory the query was written from


def _pseudo_word(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4))).capitalize()


class SyntheticCorpus:
    """`n` memories as dict records for `Memory.add_many` (text, user, session, metadata, valid_from)."""

    def __init__(self, n: int, seed: int = 7, users: int = 200):
        if n < 1:
            raise ValueError("n must be at least 1")
        self.n = n
        self.seed = seed
        rng = random.Random(seed)
        self.rare = [_pseudo_word(rng) for _ in range(max(1000, min(50_000, n // 4)))]
        self.people = []
        for u in range(min(users, n)):
            self.people.append({
                "user": f"user{u:04d}", "name": f"{rng.choice(FIRST)} {_pseudo_word(rng)}",
                "city": rng.choice(CITIES), "hobbies": rng.sample(HOBBIES, 3),
                "family": {r: rng.choice(FIRST) for r in rng.sample(RELATIONS, 3)}})
        self._facts: list[tuple[str, str, str, str]] = []  # (first name, verb, object, city) per memory

    def _rare(self, rng: random.Random) -> str:
        # Skewed towards low indexes (a few rare words recur, most appear a handful of times).
        return self.rare[int(len(self.rare) * rng.random() ** 2)]

    def records(self) -> list[dict]:
        rng = random.Random(self.seed + 1)
        start = dt.datetime(2023, 1, 1, tzinfo=dt.timezone.utc)
        clock = {p["user"]: start + dt.timedelta(hours=rng.randint(0, 500)) for p in self.people}
        out: list[dict] = []
        self._facts = []
        for i in range(self.n):
            p = self.people[int(rng.paretovariate(0.8)) % len(self.people)]  # some users talk more
            clock[p["user"]] += dt.timedelta(minutes=rng.randint(1, 60 * 24 * 3))
            first = p["name"].split()[0]
            verb, obj = rng.choice(VERBS), rng.choice(OBJECTS)
            city = p["city"] if rng.random() < 0.7 else rng.choice(CITIES)
            kind = rng.random()
            if kind < 0.5:
                text = f"{first} {verb} {obj} in {city}"
            elif kind < 0.75:
                rel, who = rng.choice(list(p["family"].items()))
                text = f"{first}'s {rel} {who} {verb} {obj} near {city} for {self._rare(rng)}"
            else:
                text = f"{first} spent the weekend on {rng.choice(p['hobbies'])} with {self._rare(rng)} in {city}"
            # Lengths: log-normal number of extra clauses and words.
            extra = min(120, int(rng.lognormvariate(2.0, 0.9)))
            words = []
            while len(words) < extra:
                if rng.random() < 0.15:
                    words.extend(rng.choice(PHRASES).split() + ["."])
                else:
                    words.append(self._rare(rng) if rng.random() < 0.15 else rng.choice(COMMON))
            if words:
                text += ", " + " ".join(words[:extra]).replace(" .", ".")
            text = text.rstrip(".") + "."
            when = clock[p["user"]]
            self._facts.append((first, verb, obj, city))
            out.append({"text": text, "user": p["user"], "session": f"{p['user']}-s{when:%Y%m%d}",
                        "metadata": {"source": "synthetic", "n": i},
                        "valid_from": when.isoformat().replace("+00:00", "Z")})
        return out

    def queries(self, count: int, seed: int | None = None) -> list[Query]:
        """Questions written from randomly chosen memories (call `records()` first)."""
        if not self._facts:
            self.records()
        rng = random.Random(self.seed + 2 if seed is None else seed)
        qs = []
        for _ in range(count):
            i = rng.randrange(self.n)
            first, verb, obj, city = self._facts[i]
            form = rng.choice(QUESTION_FORMS)
            qs.append(Query(form.format(name=first, verb=verb, verb_base=_BASE[verb], obj=obj, city=city), i))
        return qs
