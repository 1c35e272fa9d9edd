"""Tables and plots of the KV benchmark's results.json (markdown; matplotlib PNGs).

- ``table.md``: one row per method/peer and budget, memvisor's and the peers' side by side.
- ``fidelity_vs_bytes.png``: teacher-forced KL (log scale) and top-1 agreement against bytes per token.
- ``peak_vs_length.png``: peak KV bytes during prefill against input length (full prefill,
  memvisor block-wise under a fixed budget, kvpress).
"""

from __future__ import annotations

from pathlib import Path

COLUMNS = [("ratio", "ratio", "{:.2f}x"), ("bytes_per_token", "B/token", "{:.0f}"), ("bits_per_element", "bits/elem",
           "{:.2f}"), ("top1", "top-1", "{:.3f}"), ("kl", "KL", "{:.3f}"), ("greedy_agreement", "greedy", "{:.3f}"),
           ("greedy_agreement_all", "greedy (all)", "{:.3f}"),
           ("needle_retention", "needle ret.", "{:.2f}"), ("needle_accuracy", "needle acc.", "{:.2f}"),
           ("prefill_peak_bytes", "peak KV MiB", "{:.1f}"), ("prefill_s", "prefill s", "{:.1f}"),
           ("decode_tokens_per_s", "decode tok/s", "{:.1f}")]


def _cell(fig: dict, key: str, fmt: str) -> str:
    v = fig.get(key)
    if v is None:
        return "-"
    if key == "prefill_peak_bytes":
        v = v / 2**20
    return fmt.format(v)


def _rows(results: dict) -> list[tuple[str, str, str, dict]]:
    rows = [("-", "uncompressed", "full", results["uncompressed"]["full"])]
    rows += [("-", f"uncompressed, {name} prefill (lossless: the floor)", name, fig)
             for name, fig in results["uncompressed"].items() if name != "full"]
    budgets = sorted({b for g in ("methods", "peers") for m in results[g].values() for b in m},
                     key=lambda b: (b == "native", float(b[:-1]) if b.endswith("x") else 0.0))
    for b in budgets:
        for group, who in (("methods", "memvisor"), ("peers", "peer")):
            for name, per in results[group].items():
                if b in per:  # the planner's rows name the recipe it chose
                    chosen = per[b].get("recipe") if name == "auto" else None
                    rows.append((b, f"{who}: {name}" + (f" ({chosen})" if chosen else ""), b, per[b]))
    return rows


def table(results: dict) -> str:
    head = "| budget | method | " + " | ".join(c[1] for c in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for budget, name, _, fig in _rows(results):
        if "error" in fig:
            lines.append(f"| {budget} | {name} | failed: {fig['error'][:80]} |" + " |" * (len(COLUMNS) - 1))
            continue
        lines.append(f"| {budget} | {name} | " + " | ".join(_cell(fig, k, f) for k, _, f in COLUMNS) + " |")
    return "\n".join(lines)


def sweep_table(results: dict) -> str:
    sweep = results.get("sweep")
    if not sweep:
        return ""
    names = list(sweep["methods"])
    lines = ["| tokens | " + " | ".join(f"{n} peak KV MiB (prefill s)" for n in names) + " |",
             "|" + "---|" * (len(names) + 1)]
    for i, n in enumerate(sweep["lengths"]):
        cells = []
        for name in names:
            rows = sweep["methods"][name]
            r = rows[i] if i < len(rows) else None
            cells.append(f"{r['prefill_peak_bytes'] / 2**20:.1f} ({r['prefill_s']:.1f})" if r else "-")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plots(results: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for group, marker in (("methods", "o"), ("peers", "s")):
        for name, per in results[group].items():
            pts = sorted((f["bytes_per_token"], f["kl"], f["top1"]) for f in per.values()
                         if "error" not in f and f.get("kl") is not None)
            if not pts:
                continue
            x = [p[0] for p in pts]
            label = f"{'memvisor' if group == 'methods' else 'peer'}: {name}"
            axes[0].plot(x, [max(p[1], 1e-4) for p in pts], marker=marker, label=label)
            axes[1].plot(x, [p[2] for p in pts], marker=marker, label=label)
    full = results["uncompressed"]["full"]
    base = full["bytes_per_token"] * (full.get("ratio") or 1.0)  # the bf16 cache's bytes in a float32 run too
    for ax, ylabel in ((axes[0], "mean KL per token vs uncompressed (nats)"), (axes[1], "teacher-forced top-1")):
        ax.axvline(base, color="grey", ls=":", label="uncompressed bf16")
        ax.set_xscale("log")
        ax.set_xlabel("real KV bytes per context token")
        ax.set_ylabel(ylabel)
    axes[0].set_yscale("log")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{results['model']}: fidelity against real bytes")
    fig.tight_layout()
    path = out / "fidelity_vs_bytes.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    made.append(path)
    sweep = results.get("sweep")
    if sweep:
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for name, rows in sweep["methods"].items():
            ax.plot([r["tokens"] for r in rows], [r["prefill_peak_bytes"] / 2**20 for r in rows], marker="o",
                    label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("input tokens")
        ax.set_ylabel("peak KV bytes during prefill (MiB)")
        ax.set_title(f"{results['model']}: peak KV vs input length (budget {sweep['budget_bytes'] / 2**20:.2f} MiB)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / "peak_vs_length.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)
    return made


def write_report(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    meta = results.get("meta", {})
    text = (f"Model {results['model']}, {meta.get('date')}, {meta.get('machine')}, torch {meta.get('torch')}, "
            f"transformers {meta.get('transformers')}, {meta.get('dtype')}, contexts {meta.get('context_tokens')} "
            f"tokens ({meta.get('kinds')}), {meta.get('gen_tokens')} generated tokens.\n\n" + table(results) + "\n")
    sw = sweep_table(results)
    if sw:
        text += f"\nPeak KV during prefill (budget {results['sweep']['budget_bytes']} B):\n\n" + sw + "\n"
    (out / "table.md").write_text(text)
    try:
        plots(results, out)
    except ImportError as exc:  # matplotlib is in the `bench` extra
        (out / "plots_missing.txt").write_text(f"plots need matplotlib (pip install 'memvisor[bench]'): {exc}\n")


def merge_results(paths: list[Path]) -> dict:
    """Merge results.json files of runs split over processes (same model, tasks and environment):
    methods, peers and the sweep are united; the first file's uncompressed reference and meta are kept,
    the others' references are listed under ``meta.references`` so they can be compared."""
    import json

    runs = [json.loads(Path(p).read_text()) for p in paths]
    if len({r["model"] for r in runs}) != 1:
        raise ValueError(f"cannot merge results of different models: {[r['model'] for r in runs]}")
    out = json.loads(json.dumps(runs[0]))
    out["meta"]["merged_from"] = [str(p) for p in paths]
    out["meta"]["references"] = [r["uncompressed"]["full"] for r in runs]
    for r in runs[1:]:
        for group in ("methods", "peers"):
            for name, per in r[group].items():
                out[group].setdefault(name, {}).update(per)
        if r.get("sweep") and not out.get("sweep"):
            out["sweep"] = r["sweep"]
    return out
