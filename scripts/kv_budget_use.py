"""How much of its byte budget a compressed cache holds after a one-forward prefill, per token policy.

    python scripts/kv_budget_use.py [--divisors 8,9,10] [--policies streaming,h2o,scissorhands] [--residual 0]

SmolLM2 (float32, as loaded), the kv tests' lighthouse prompt (349 tokens), KIVI-4 at group 32 with ``--residual``
full-precision tokens, ``slack=0``, budget = the plain cache's bytes / divisor. Prints, per divisor and policy, the
share of the budget held and the tokens a head of layer 0 keeps. For an A/B with an older tree, run it with
``PYTHONPATH=OLD/src`` (it computes the plain cache's bytes itself, so it runs on trees without
``uncompressed_bytes``). Session 20: Scissorhands at divisor 8 kept 21 tokens and 48% before its per-token
statistics were planned at their size after the eviction, 87 and 99.5% after.
"""
from __future__ import annotations

import argparse

from memvisor.kv import CacheSpec, CompressedCache, load_local_model, prefill_blockwise
from memvisor.kv.adapter import kv_shape
from memvisor.kv.policies import H2O, Scissorhands, StreamingLLM

PROMPT = (("The lighthouse keepers of the northern coast kept a logbook of the weather, the ships that passed and "
           "every repair to the lamp. ") * 6
          + "In 1887 the keeper Margaret Olsen wrote that the secret code word is BLUEBERRY. "
          + "Supplies came by boat every second week: oil, flour, letters and newspapers from the mainland. " * 8
          + "Question: what is the secret code word? Answer: the secret code word is")
POLICIES = {"streaming": lambda: StreamingLLM(sinks=4), "h2o": lambda: H2O(recent=16), "scissorhands": Scissorhands}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--divisors", default="8,9,10")
    ap.add_argument("--policies", default="streaming,h2o,scissorhands")
    ap.add_argument("--residual", type=int, default=0)
    args = ap.parse_args()
    model, tok = load_local_model("smollm2")
    ids = tok(PROMPT, return_tensors="pt").input_ids
    layers, heads, dim = kv_shape(model.config)
    plain = ids.shape[1] * layers * heads * dim * 2 * model.dtype.itemsize
    for div in (int(d) for d in args.divisors.split(",")):
        budget = plain // div
        for name in args.policies.split(","):
            cache = CompressedCache(model.config, CacheSpec(budget_bytes=budget, quant="kivi4", residual=args.residual,
                                                            token_policy=POLICIES[name](), slack=0))
            prefill_blockwise(model, ids, cache, block=ids.shape[1])
            print(f"plain/{div} {name:13s} holds {cache.nbytes() / budget:.3f} of {budget:,} B, "
                  f"{max(cache.stored_tokens()[0])} tokens a head of {ids.shape[1]}")


if __name__ == "__main__":
    main()
