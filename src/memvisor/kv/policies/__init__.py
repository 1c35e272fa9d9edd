"""KV-cache compression policies: pure tensor code that DECIDES; the cache (``memvisor.kv``) stores.

Kinds (protocol in ``base``):
- token policies (``TokenPolicy``: which tokens of a layer to keep): ``streaming`` (StreamingLLM),
  ``knorm`` (key norm), ``h2o`` (H2O), ``scissorhands`` (Scissorhands), ``snapkv`` (SnapKV);
- channel policy (``ChannelPolicy``): ``think`` (ThinK);
- merge policy (``MergePolicy``): ``merge`` (KVMerger);
- layer budgets (``LayerBudget``): ``uniform``, ``pyramid`` (PyramidKV), ``sensitivity`` (EpiCache);
- head budgets (``HeadBudget``): ``head-uniform``, ``adakv`` (Ada-KV, ragged).

How the cache drives a token policy for one layer (B batch, Hkv KV heads, T tokens)::

    pol = POLICIES["h2o"](recent=32).fresh()          # one instance per layer
    pol.observe(q, k, lengths=lens)                    # every forward, after appending k (skip if not pol.needs_queries)
    # or, when pol.observes_probs and the forward ran the block loop (decode, short appends), with the
    # softmax rows that attention already computed, averaged per query group ([B, Hkv, Tq, T]):
    pol.observe_probs(probs, n_visible, lengths=lens)
    s = pol.scores(k, v, lengths=lens)                 # [B, Hkv, T] when over budget
    prot = pol.protected_mask(T, lens, n_heads=Hkv)    # [Hkv, T]
    counts = AdaKVHeadBudget().split(s, prot, layer_budget, lengths=lens)   # or an int per head
    kept = select(s, prot, counts, lengths=lens)       # list of Hkv sorted LongTensors
    new_k, new_v = KVMerger().merge(k, v, kept, lengths=lens)  # or gather k[:, h, kept[h]]
    pol.on_evict(kept)                                 # statistics follow their tokens

How to add a policy:
1. One file ``src/memvisor/kv/policies/<name>.py`` with one class subclassing the right ABC in ``base``
   (``TokenPolicy``: implement ``scores``; override ``observe``/``protected``/``on_evict``/``reset`` as
   needed; set ``name`` and ``needs_queries``). Keep per-token statistics as ``[..., Hkv, T]`` tensors and
   use ``_stats.extend`` / ``_stats.reindex`` / ``_stats.finish_scores``; get attention rows from
   ``_attention.group_attention`` (causal block mask, ragged padding, GQA mean). A policy whose statistics
   need only those rows subclasses ``_attention.AttentionStatsPolicy`` and implements ``observe_probs`` (its
   ``observe`` feeds it from ``group_attention``): decode steps then cost it no second pass over the history.
2. Docstring: the paper, tensor shapes and units, every knob with its default, GQA reduction, masking.
3. Register it below in ``POLICIES`` under its short ``name``.
4. Tests in ``tests/kv/test_policies_<name>.py``: hand-made queries/keys giving known attention, asserting
   the exact kept index sets, and that ``on_evict`` moves statistics with their tokens.
"""

from memvisor.kv.policies.base import (
    BudgetTooSmallError,
    ChannelPolicy,
    HeadBudget,
    LayerBudget,
    MergePolicy,
    PolicyError,
    TokenPolicy,
    knobs,
    select,
    valid_mask,
)
from memvisor.kv.policies.h2o import H2O
from memvisor.kv.policies.head_adakv import AdaKVHeadBudget
from memvisor.kv.policies.head_uniform import UniformHeadBudget
from memvisor.kv.policies.knorm import KeyNorm
from memvisor.kv.policies.layer_pyramid import PyramidLayerBudget
from memvisor.kv.policies.layer_sensitivity import SensitivityLayerBudget, attention_mass_lost, measure_sensitivity
from memvisor.kv.policies.layer_uniform import UniformLayerBudget
from memvisor.kv.policies.merge import KVMerger
from memvisor.kv.policies.scissorhands import Scissorhands
from memvisor.kv.policies.snapkv import SnapKV
from memvisor.kv.policies.streaming import StreamingLLM
from memvisor.kv.policies.think import ThinK

POLICIES: dict[str, type] = {
    cls.name: cls
    for cls in (
        StreamingLLM,
        KeyNorm,
        H2O,
        Scissorhands,
        SnapKV,
        ThinK,
        KVMerger,
        UniformLayerBudget,
        PyramidLayerBudget,
        SensitivityLayerBudget,
        UniformHeadBudget,
        AdaKVHeadBudget,
    )
}


def make_policy(name: str, **knobs):
    """Instantiate a registered policy by short name; PolicyError lists the names on a typo."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise PolicyError(f"unknown KV policy {name!r}; known: {', '.join(sorted(POLICIES))}") from None
    return cls(**knobs)


__all__ = [
    "POLICIES",
    "AdaKVHeadBudget",
    "BudgetTooSmallError",
    "ChannelPolicy",
    "H2O",
    "HeadBudget",
    "KVMerger",
    "KeyNorm",
    "LayerBudget",
    "MergePolicy",
    "PolicyError",
    "PyramidLayerBudget",
    "Scissorhands",
    "SensitivityLayerBudget",
    "SnapKV",
    "StreamingLLM",
    "ThinK",
    "TokenPolicy",
    "UniformHeadBudget",
    "UniformLayerBudget",
    "knobs",
    "attention_mass_lost",
    "make_policy",
    "measure_sensitivity",
    "select",
    "valid_mask",
]
