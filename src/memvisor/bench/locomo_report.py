"""results.md tables and recall.png for a LoCoMo run (read from the results.json dict)."""
from __future__ import annotations

from pathlib import Path


def _f(x, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


ORDER = ("memvisor", "mem0", "mem0-dense", "bm25", "dense", "recency", "full")


def ordered(systems: dict) -> dict:
    names = [n for n in ORDER if n in systems] + sorted(n for n in systems if n not in ORDER)
    return {n: systems[n] for n in names}


def markdown(results: dict) -> str:
    ds = results["dataset"]
    systems = ordered(results["systems"])
    budgets = sorted({int(b) for s in systems.values() for b in s["recall"]})
    lines = [f"# LoCoMo evidence recall — {len(ds['conversations'])} conversations, {ds['questions']} questions",
             "", f"Data sha256 `{ds['sha256'][:16]}…`; machine: {results['machine']}; date {results['date']}.",
             f"Command: `{results.get('command', '')}`",
             f"Load average (1/5/15 min) at start {results.get('load_average_start')}, "
             f"at end {results.get('load_average_end')}.", "",
             "## Overall evidence recall (categories 1-4) by context budget (tokens)", "",
             "| system | " + " | ".join(str(b) for b in budgets) + " | MRR |",
             "|---|" + "---:|" * (len(budgets) + 1)]
    for name, s in systems.items():
        lines.append(f"| {name} | " + " | ".join(_f(s["recall"][str(b)]["overall"]) for b in budgets)
                     + f" | {_f(s['mrr'])} |")
    for b in budgets:
        lines += ["", f"## Recall by category at {b} tokens (1 multi-hop, 2 temporal, 3 open-domain, "
                      "4 single-hop, 5 adversarial) and mean context tokens used", "",
                  "| system | overall | 1 | 2 | 3 | 4 | 5 | tokens used |", "|---|" + "---:|" * 7]
        for name, s in systems.items():
            r = s["recall"][str(b)]
            lines.append(f"| {name} | " + " | ".join(_f(r[k]) for k in ("overall", "1", "2", "3", "4", "5"))
                         + f" | {_f(s['context_tokens'][str(b)], 0)} |")
    lines += ["", "## Cost", "",
              "| system | ingest s | turns/s | search p50 / p95 / p99 ms | context p50 / p95 ms | peak RSS MiB "
              "| load avg (1 min) start, end |",
              "|---|---:|---:|---:|---:|---:|---|"]
    for name, s in systems.items():
        sm, cm = s["search_ms"], s.get("context_ms", {})
        lines.append(f"| {name} | {_f(s['ingest_seconds'], 1)} | {_f(s.get('ingest_turns_per_s'), 0)} | "
                     f"{_f(sm['p50'], 1)} / {_f(sm['p95'], 1)} / {_f(sm['p99'], 1)} | "
                     f"{_f(cm.get('p50'), 1)} / {_f(cm.get('p95'), 1)} | {_f(s['peak_rss_mb'], 0)} | "
                     f"{(s.get('load_average_start') or ['–'])[0]}, {(s.get('load_average_end') or ['–'])[0]} |")
    answered = {n: s["answer"] for n, s in systems.items() if "answer" in s}
    if answered:
        lines += ["", "## Answers (LoCoMo token F1; category 5: refusal rate)", "",
                  "| system | budget | model | F1 overall | 1 | 2 | 3 | 4 | 5 | judge overall |",
                  "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        for n, a in answered.items():
            f1 = a["f1"]
            j = a.get("judge_accuracy", {}).get("overall")
            lines.append(f"| {n} | {a['budget']} | {a['model']} | " +
                         " | ".join(_f(f1[k]) for k in ("overall", "1", "2", "3", "4", "5")) + f" | {_f(j)} |")
    notes = {n: s for n, s in systems.items() if s.get("malformed_evidence_entries")}
    if notes:
        s = next(iter(notes.values()))
        lines += ["", f"Evidence: {s['malformed_evidence_entries']} malformed entries "
                      f"({s['evidence_ids_recovered_from_malformed']} dia_ids recovered from them), "
                      f"{s['questions_without_valid_evidence']} questions without a valid evidence id "
                      "(left out of recall)."]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")  # no display: write the file only
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, s in ordered(results["systems"]).items():
        budgets = sorted(int(b) for b in s["recall"])
        if name == "full":
            # One point: recall at its real size, not at the nominal budgets.
            tok = max(v for v in s["context_tokens"].values() if v is not None)
            ax.scatter([tok], [s["recall"][str(budgets[-1])]["overall"]], marker="*", s=120, color="black",
                       label=f"full ({tok:,.0f} tokens)")
            continue
        ys = [s["recall"][str(b)]["overall"] for b in budgets]
        ax.plot(budgets, ys, marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context budget (SmolLM2 tokens)")
    ax.set_ylabel("evidence recall, categories 1-4")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(f"LoCoMo ({results['dataset']['questions']} questions): evidence in context")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
