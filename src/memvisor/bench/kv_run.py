"""The CPU KV benchmark: memvisor's methods and the peers under the same byte budgets, one process.

For each needle task (kv_needles.py) the uncompressed model (DynamicCache, full prefill) gives the
reference: its greedy continuation of ``gen_tokens`` tokens after the question and its logits
along it. Every method then (1) prefills the context into its own cache (timed; peak KV bytes and
peak RSS recorded), (2) runs the question uncompressed on top, (3) on a copy of that state,
teacher-forces the reference continuation in one forward (top-1 agreement, mean KL per token),
(4) decodes greedily ``gen_tokens`` tokens (tokens/s, whether the needle's value is in the first 24
tokens, and agreement with the reference: ``greedy_agreement`` over the reference's answer, up to its
end-of-sequence token as ``generate`` would stop; ``greedy_agreement_all`` over all ``gen_tokens``
positions, past that end too). Bytes are measured after the context (before the
question): ``bytes_per_token`` = real bytes / context tokens, ``ratio`` = the uncompressed bf16
cache's bytes / the method's, ``bits_per_element`` = 8 x bytes / K+V elements actually stored.
``needle_retention`` = hits / the uncompressed model's hits over the same tasks.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import platform
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from memvisor.bench.kv_methods import DEFAULT_METHODS, memvisor_method
from memvisor.bench.kv_metrics import KVPeakTracker, RSSPeak, cache_bytes, fidelity, greedy_agreement, stored_elements
from memvisor.bench.kv_needles import answer_found, make_task, task_kinds
from memvisor.bench.kv_peers import (ALL_PEERS, KVPRESS_PRESSES, QUANTO_PEERS, Method, PeerUnavailable, kvpress_method,
                                     lossless_blocked_method, peers_available, plain_method, quanto_method)

DEFAULT_BUDGETS = [2.0, 4.0, 8.0]
DEFAULT_LENGTHS = {"smollm2": [2048, 4096, 8192], "gemma3": [2048, 4096, 8192, 16384]}
FIGURES = ["bits_per_element", "bytes_per_token", "ratio", "greedy_agreement", "greedy_agreement_all", "top1", "kl",
           "needle_retention", "needle_accuracy", "prefill_peak_bytes", "prefill_peak_rss_bytes", "prefill_s", "decode_tokens_per_s"]


@dataclass
class KvBenchConfig:
    model: str
    out: Path
    budgets: list[float] | None = None
    methods: list[str] | None = None
    peers: list[str] | None = None
    tokens: int = 4096
    samples: int = 3
    gen_tokens: int = 128
    lengths: list[int] | None = None
    seed: int = 0
    threads: int = 2
    sweep_budget_ratio: float = 8.0
    sweep: bool = True
    floor: bool = True  # also run a lossless cache prefilled in blocks: the fidelity rounding alone costs
    # The model's weights and activations. Budgets and ratios stay against the context's bf16 cache (the
    # issue's unit) in either; float32 shows fidelity without bf16's own rounding (a lossless floor of 1.0).
    dtype: str = "bfloat16"
    # memvisor methods prefill the context in blocks of this many tokens (compressing after each); 0: in one
    # forward, as ``generate`` does: each layer attends its whole context uncompressed, then compresses (peak: the
    # budget plus one layer's context), as kvpress's presses do
    prefill_block: int = 512
    extra: dict = field(default_factory=dict)


@dataclass
class Prompt:
    ctx: torch.Tensor  # [1, T] context ids
    question: torch.Tensor  # [1, Tq] question + answer prefix ids
    answers: list[str]
    kind: str
    depths: list[float] = field(default_factory=list)  # where the asked needle sits: tokens before it / context tokens


def build_prompts(tok: Any, cfg: KvBenchConfig) -> list[Prompt]:
    """Needle prompts: chat-formatted when the tokenizer has a chat template, plain otherwise."""
    intro = "Read the text below and answer the question at the end.\n\n"
    if getattr(tok, "chat_template", None):
        marker = "@@CONTENT@@"
        wrapped = tok.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                          add_generation_prompt=True)
        pre, post = wrapped.split(marker)
        head, q_tpl = pre + intro, "\n\nQuestion: {q}" + post + "{prefix}"
    else:
        head, q_tpl = intro, "\n\nQuestion: {q}\nAnswer: {prefix}"

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    head_tokens = len(tok(head)["input_ids"])
    prompts = []
    for i, kind in enumerate(task_kinds(cfg.samples)):
        task = make_task(kind, cfg.tokens - head_tokens, count, seed=cfg.seed * 1000 + i)
        text = head + task.context
        ctx = tok(text, return_tensors="pt")["input_ids"]
        q = tok(q_tpl.format(q=task.question, prefix=task.answer_prefix), add_special_tokens=False,
                return_tensors="pt")["input_ids"]
        # StreamingLLM forgets the oldest tokens: a needle's depth says whether an eviction could reach it
        starts = [m.start() for m in re.finditer(re.escape(f"for {task.asked} is:"), text)]
        depths = [round(len(tok(text[:i])["input_ids"]) / ctx.shape[1], 3) for i in starts]
        prompts.append(Prompt(ctx, q, task.answers, kind, depths))
    return prompts


def _forward(model: Any, key: str, cache: Any, ids: torch.Tensor, start: int) -> torch.Tensor:
    pos = torch.arange(start, start + ids.shape[1]).unsqueeze(0)
    return model(input_ids=ids, position_ids=pos, use_cache=True, **{key: cache}).logits[0]


@torch.no_grad()
def run_one(model: Any, tok: Any, method: Method, prompt: Prompt, ref: dict | None, gen: int,
            tracker: KVPeakTracker) -> dict:
    """Measure one method on one prompt (see module docstring). ``ref`` None: this IS the reference."""
    from memvisor.kv.adapter import cache_kwarg, kv_shape

    key = cache_kwarg(model)
    cache = method.new_cache()
    tracker.track(cache)
    t_ctx = prompt.ctx.shape[1]
    with RSSPeak() as rss:
        t0 = time.perf_counter()
        method.prefill(model, prompt.ctx, cache, key)
        prefill_s = time.perf_counter() - t0
    tracker.measure()
    peak = max(tracker.peak, int(getattr(cache, "peak_bytes", 0) or 0))
    nbytes = cache_bytes(cache)
    elements = stored_elements(cache, kv_shape(model.config)[2])
    first = _forward(model, key, cache, prompt.question, t_ctx)[-1:]  # [1, V]: the first answer token
    start = t_ctx + prompt.question.shape[1]
    out: dict = {"bytes": nbytes, "elements": elements, "context_tokens": t_ctx, "prefill_s": prefill_s,
                 "prefill_peak_bytes": peak, "prefill_peak_rss_bytes": rss.peak_delta}
    if ref is not None:
        try:
            forced_cache = copy.deepcopy(cache)
        except (RuntimeError, TypeError):  # quanto's tensors refuse deepcopy: rebuild the same state
            forced_cache = method.new_cache()
            method.prefill(model, prompt.ctx, forced_cache, key)
            _forward(model, key, forced_cache, prompt.question, t_ctx)
        ref_toks = ref["tokens"]
        rest = _forward(model, key, forced_cache, torch.tensor([ref_toks[:-1]]), start)
        out.update(fidelity(ref["logits"], torch.cat([first, rest], 0)))
        del forced_cache
    tracker.track(None)
    # free-running greedy decode
    toks = [int(first[-1].argmax())]
    logits = [first[-1].float()]
    t0 = time.perf_counter()
    for i in range(gen - 1):
        step = _forward(model, key, cache, torch.tensor([[toks[-1]]]), start + i)[-1]
        toks.append(int(step.argmax()))
        if ref is None:
            logits.append(step.float())
    out["decode_tokens_per_s"] = (gen - 1) / (time.perf_counter() - t0)
    out["tokens"] = toks
    out["needle_hit"] = answer_found(tok.decode(toks[:24], skip_special_tokens=True), prompt.answers)
    out["kind"] = prompt.kind
    if ref is None:
        out["logits"] = torch.stack(logits)
    else:
        out["greedy_agreement"] = greedy_agreement(ref["tokens"], toks, stop_tokens(model, tok))
        out["greedy_agreement_all"] = greedy_agreement(ref["tokens"], toks)  # every position, past the end too
    return out


def stop_tokens(model: Any, tok: Any) -> frozenset[int]:
    """The ids that end a generation: the model's generation config's and the tokenizer's end of sequence."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = list(ids) if isinstance(ids, (list, tuple)) else [ids]
    return frozenset(int(i) for i in [*ids, tok.eos_token_id] if i is not None)


def bf16_scale(dtype: torch.dtype) -> float:
    """Bytes of a bf16 cache per byte of a ``dtype`` cache (0.5 for float32): budgets and ratios are
    against the bf16 cache (the issue's unit) whatever dtype a run uses."""
    return 16 / torch.finfo(dtype).bits


def aggregate(runs: list[dict], refs: list[dict], ref_scale: float = 1.0) -> dict:
    """Per-sample runs -> the issue's figures (means; needle retention relative to the reference).
    ``ref_scale``: :func:`bf16_scale` of the run's dtype, so ``ratio`` is always against bf16."""
    def mean(k: str) -> float | None:
        vals = [r[k] for r in runs if r.get(k) is not None]
        return sum(vals) / len(vals) if vals else None

    bytes_ = sum(r["bytes"] for r in runs)
    ref_bytes = sum(r["bytes"] for r in refs) * ref_scale
    ref_hits = sum(1 for r in refs if r["needle_hit"])
    hits = sum(1 for r, rf in zip(runs, refs) if r["needle_hit"] and rf["needle_hit"])
    tokens = sum(r["context_tokens"] for r in runs)
    return {
        "bits_per_element": 8 * bytes_ / max(1, sum(r["elements"] for r in runs)),
        "bytes_per_token": bytes_ / tokens,
        "ratio": ref_bytes / bytes_ if bytes_ else None,
        "greedy_agreement": mean("greedy_agreement"),
        "greedy_agreement_all": mean("greedy_agreement_all"),
        "top1": mean("top1"),
        "kl": mean("kl"),
        "needle_retention": hits / ref_hits if ref_hits else None,
        "needle_accuracy": sum(1 for r in runs if r["needle_hit"]) / len(runs),
        "prefill_peak_bytes": max(r["prefill_peak_bytes"] for r in runs),
        "prefill_peak_rss_bytes": max(r["prefill_peak_rss_bytes"] for r in runs),
        "prefill_s": mean("prefill_s"),
        "decode_tokens_per_s": mean("decode_tokens_per_s"),
        "samples": len(runs),
        "needle_accuracy_by_kind": _by_kind(runs),
        "needle_hits": [bool(r["needle_hit"]) for r in runs],  # per task, in the order of meta.kinds
    }


def _by_kind(runs: list[dict]) -> dict:
    """Needle accuracy per task kind: {kind: hits / tasks}."""
    out: dict = {}
    for r in runs:
        out.setdefault(r.get("kind", "?"), []).append(bool(r["needle_hit"]))
    return {k: sum(v) / len(v) for k, v in out.items()}


def _brief(fig: dict) -> str:
    keys = ("ratio", "top1", "kl", "greedy_agreement", "needle_retention", "prefill_s", "prefill_peak_bytes")
    return " ".join(f"{k} {fig[k]:.4g}" if isinstance(fig.get(k), (int, float)) else f"{k} -" for k in keys)


def _budget_key(x: float) -> str:
    return f"{x:g}x"


def _peer_methods(name: str, budget: float, model: Any, base_bytes: float, tokens: float, dtype_bytes: int = 2
                  ) -> list[tuple[str, str, Method]]:
    """(row name, budget key, method). kvpress runs at its claimed ratio ``1 - 1/budget`` (of the bf16
    cache's bytes: ``1 - 1/(2 budget)`` of a float32 cache's tokens); where its
    config-less cache keeps every token of sliding-window layers (so its real bytes miss the claim)
    it runs a second time as ``<name>@eq`` at the ratio whose real bytes equal ``base_bytes / budget``
    (``base_bytes``: the bf16 cache's; ``dtype_bytes``: bytes per element of the run's caches)."""
    from memvisor.kv.adapter import kv_shape, layer_windows

    if name in KVPRESS_PRESSES:
        # its claim, in bf16 bytes: keep 1/budget of the bf16 cache (a float32 cache keeps half as many tokens)
        out = [(name, _budget_key(budget), kvpress_method(name, 1.0 - 2.0 / dtype_bytes / budget))]
        if any(w is not None for w in layer_windows(model.config)):
            n_layers, n_kv, head_dim = kv_shape(model.config)
            every_token = 2 * n_layers * n_kv * head_dim * dtype_bytes * tokens  # K+V of every layer
            ratio = 1.0 - base_bytes / budget / every_token
            out.append((f"{name}@eq", _budget_key(budget), kvpress_method(name, ratio)))
        return out
    if name in QUANTO_PEERS:
        return [(name, "native", quanto_method(name, model.config))]
    raise ValueError(f"unknown peer {name!r}; known: {ALL_PEERS}")


def run_kv_bench(cfg: KvBenchConfig, log: Callable[[str], None] = print) -> dict:
    """Run everything for ``cfg.model`` and write results.json, table.md and plots under ``cfg.out``."""
    from memvisor.bench.kv_report import write_report
    from memvisor.kv import load_local_model
    from memvisor.kv.adapter import TRANSFORMERS_VERSION

    if cfg.model not in DEFAULT_LENGTHS:
        raise ValueError(f"--model must be one of {sorted(DEFAULT_LENGTHS)}, got {cfg.model!r}")
    budgets = cfg.budgets or DEFAULT_BUDGETS
    if any(b < 1 for b in budgets):
        raise ValueError(f"budgets are compression ratios >= 1 (e.g. 2,4,8), got {budgets}")
    methods = [] if cfg.methods == ["skip"] else (cfg.methods or DEFAULT_METHODS)
    if cfg.peers == ["none"]:
        peers: list[str] = []
    elif cfg.peers:
        missing = [p for p in cfg.peers if p not in ALL_PEERS]
        if missing:
            raise ValueError(f"unknown peers {missing}; known: {ALL_PEERS}")
        peers = cfg.peers
    else:
        peers = peers_available()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    if cfg.dtype not in ("bfloat16", "float32"):
        raise ValueError(f"--dtype must be bfloat16 or float32, got {cfg.dtype!r}")
    if cfg.prefill_block < 0:
        raise ValueError(f"--prefill-block must be >= 0 (0: one forward), got {cfg.prefill_block}")
    dtype = getattr(torch, cfg.dtype)
    model, tok = load_local_model(cfg.model, dtype=dtype)
    tracker = KVPeakTracker(model)  # registered before any peer's hooks
    prompts = build_prompts(tok, cfg)
    log(f"{cfg.model}: {len(prompts)} tasks of {[p.ctx.shape[1] for p in prompts]} context tokens")
    refs = [run_one(model, tok, plain_method(model.config), p, None, cfg.gen_tokens, tracker) for p in prompts]
    ref_scale = bf16_scale(dtype)
    base_bytes = sum(r["bytes"] for r in refs) / len(refs) * ref_scale
    results: dict = {
        "model": cfg.model, "methods": {}, "peers": {},
        "uncompressed": {"full": aggregate(refs, refs, ref_scale)},
        "meta": {"date": _dt.date.today().isoformat(), "machine": f"{platform.machine()} CPU, torch threads "
                 f"{cfg.threads}", "torch": torch.__version__, "transformers": TRANSFORMERS_VERSION,
                 "dtype": cfg.dtype, "context_tokens": [p.ctx.shape[1] for p in prompts],
                 "kinds": [p.kind for p in prompts], "gen_tokens": cfg.gen_tokens,
                 "reference_needle_hits": [r["needle_hit"] for r in refs], "prefill_block": cfg.prefill_block,
                 "needle_depths": [p.depths for p in prompts]},
    }
    log(f"uncompressed: {_brief(results['uncompressed']['full'])}")
    if cfg.floor:
        lossless = lossless_blocked_method(model.config)
        runs = [run_one(model, tok, lossless, p, rf, cfg.gen_tokens, tracker) for p, rf in zip(prompts, refs)]
        results["uncompressed"][lossless.name] = aggregate(runs, refs, ref_scale)
        log(f"uncompressed, {lossless.name} (lossless floor): {_brief(results['uncompressed'][lossless.name])}")

    def record(group: str, name: str, bkey: str, method: Method) -> None:
        # A peer that crashes on this model (kvpress ExpectedAttention calls Gemma 3's rotary embedding
        # without its layer type: AttributeError) is a result, not the end of the run.
        caught = Exception if group == "peers" else (PeerUnavailable, ValueError, RuntimeError)
        try:
            runs = [run_one(model, tok, method, p, rf, cfg.gen_tokens, tracker) for p, rf in zip(prompts, refs)]
        except caught as exc:
            log(f"{name} {bkey}: FAILED {type(exc).__name__}: {exc}")
            results[group].setdefault(name, {})[bkey] = {"error": f"{type(exc).__name__}: {exc}"}
            return
        fig = aggregate(runs, refs, ref_scale)
        fig.update({k: v for k, v in method.info.items() if isinstance(v, (int, float, str)) or v is None})
        results[group].setdefault(name, {})[bkey] = fig
        log(f"{name} {bkey}: " + _brief(fig))
        _save(results, cfg.out)

    block = cfg.prefill_block or max(p.ctx.shape[1] for p in prompts)
    for budget in budgets:
        budget_bytes = int(base_bytes / budget)
        for name in methods:
            record("methods", name, _budget_key(budget), memvisor_method(name, model.config, budget_bytes, block=block,
                                                                          context_tokens=cfg.tokens))
        for peer in peers:
            if peer in QUANTO_PEERS and budget != budgets[0]:
                continue
            mean_tokens = sum(p.ctx.shape[1] for p in prompts) / len(prompts)
            for row, bkey, method in _peer_methods(peer, budget, model, base_bytes, mean_tokens,
                                                   torch.finfo(dtype).bits // 8):
                record("peers", row, bkey, method)
    if cfg.sweep:
        results["sweep"] = memory_sweep(model, tok, cfg, base_bytes / cfg.tokens, tracker, log)
    _save(results, cfg.out)
    write_report(results, cfg.out)
    return results


def memory_sweep(model: Any, tok: Any, cfg: KvBenchConfig, bf16_per_token: float, tracker: KVPeakTracker,
                 log: Callable[[str], None]) -> dict:
    """Peak KV bytes and prefill time against input length: full prefill, memvisor block-wise under
    a FIXED budget (``sweep_budget_ratio`` below bf16 at 2k tokens), kvpress SnapKV at the same ratio."""
    from memvisor.kv.adapter import cache_kwarg

    lengths = cfg.lengths or DEFAULT_LENGTHS[cfg.model]
    key = cache_kwarg(model)
    budget_bytes = int(bf16_per_token * 2048 / cfg.sweep_budget_ratio)
    contenders = [plain_method(model.config), memvisor_method("kivi2+snapkv", model.config, budget_bytes)]
    if "kvpress-snapkv" in peers_available():  # the same bytes in either dtype (ratios are against bf16)
        contenders.append(kvpress_method("kvpress-snapkv",
                                         1.0 - bf16_scale(getattr(torch, cfg.dtype)) / cfg.sweep_budget_ratio))
    out: dict = {"budget_bytes": budget_bytes, "lengths": lengths, "methods": {}}
    vocab = tok.vocab_size
    g = torch.Generator().manual_seed(cfg.seed)
    for n in lengths:
        ids = torch.randint(100, min(vocab, 30000), (1, n), generator=g)  # content does not change memory
        for m in contenders:
            cache = m.new_cache()
            tracker.track(cache)
            with RSSPeak() as rss, torch.no_grad():
                t0 = time.perf_counter()
                m.prefill(model, ids, cache, key)
                dt = time.perf_counter() - t0
            tracker.measure()
            peak = max(tracker.peak, int(getattr(cache, "peak_bytes", 0) or 0))
            out["methods"].setdefault(m.name, []).append(
                {"tokens": n, "prefill_peak_bytes": peak, "prefill_peak_rss_bytes": rss.peak_delta,
                 "prefill_s": dt, "bytes": cache_bytes(cache)})
            log(f"sweep {m.name} {n}: peak KV {peak / 2**20:.1f} MiB, RSS +{rss.peak_delta / 2**20:.0f} MiB, {dt:.1f}s")
            tracker.track(None)
            del cache
    return out


def _save(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
