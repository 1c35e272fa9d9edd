"""Session 17's retrieval oracles on the LoCoMo dev set, offline over `scripts/dump_candidates.py`'s output with
`simulate_packing` (default knobs: rrf_k 10, weights 1, speaker 0.05, two neighbours a side): how much recall at
1,024 tokens a per-question choice of a knob could add at best, before building a rule that makes the choice.
Both are upper bounds (each question gets whichever setting scored best on its own evidence), and the second is
inflated by picking the best of 27 noisy settings per question.

    python scripts/retrieval_probes_s17.py neighbours   # neighbours per side, 0-3, chosen per question
    python scripts/retrieval_probes_s17.py weights      # BM25 / dense / speaker weights, 3 x 3 x 3, per question
"""
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import simulate_packing as sp  # noqa: E402

BASE = dict(k=10, wb=1.0, wv=1.0, spk=0.05, nb=2)


def oracle(settings: dict) -> None:
    """Overall recall (categories 1-4) of each setting, then of the best setting per question."""
    hits = {}
    for name, cfg in settings.items():
        hits[name] = {}
        overall, _ = sp.run(dict(BASE, **cfg), 1024, per_question=hits[name])
        print(name, round(overall, 4))
    first = next(iter(hits.values()))
    keys = [k for k, (cat, _) in first.items() if cat in "1234"]
    best = sum(max(h[k][1] for h in hits.values()) for k in keys) / len(keys)
    print("best per question", round(best, 4))


if __name__ == "__main__":
    if sys.argv[1:] == ["neighbours"]:
        oracle({f"nb {n}": {"nb": n} for n in (0, 1, 2, 3)})
    elif sys.argv[1:] == ["weights"]:
        grid = itertools.product((0.5, 1.0, 1.5), (0.5, 1.0, 1.5), (0.0, 0.05, 0.15))
        oracle({f"wb {wb} wv {wv} spk {spk}": {"wb": wb, "wv": wv, "spk": spk} for wb, wv, spk in grid})
    else:
        sys.exit(__doc__)
