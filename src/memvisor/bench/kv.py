"""`memvisor bench kv` and `memvisor bench kv-gpu`: the KV-cache benchmarks' command-line entry points.

``register(bench_app)`` adds both commands to the ``memvisor bench`` typer group. The work is in
``kv_run.py`` (CPU fidelity/memory benchmark on the local models, peers side by side) and
``kv_gpu.py`` (fused decode-attention kernel timing on a CUDA card).
"""

from __future__ import annotations

from pathlib import Path

import typer


def _split_csv(text: str | None) -> list[str] | None:
    if text is None:
        return None
    vals = [x.strip() for x in text.split(",") if x.strip()]
    return vals or None


def register(bench_app: typer.Typer) -> None:
    """Add the ``kv`` and ``kv-gpu`` commands to ``bench_app``."""

    @bench_app.command("kv")
    def kv_cmd(
        model: str = typer.Option(..., "--model", help="smollm2 or gemma3"),
        out: Path = typer.Option(..., "--out", help="folder for results.json, table.md and plots"),
        budgets: str | None = typer.Option(None, "--budgets",
                                           help="comma-separated compression ratios vs bf16 bytes, e.g. 2,4,8"),
        methods: str | None = typer.Option(None, "--methods",
                                           help="comma-separated memvisor methods (default all), 'skip' for none"),
        peers: str | None = typer.Option(None, "--peers",
                                         help="comma-separated peers, 'none' to skip (default all that import)"),
        tokens: int = typer.Option(4096, "--tokens", help="input length of the needle tasks, in tokens"),
        samples: int = typer.Option(4, "--samples", help="needle tasks per method and budget"),
        gen_tokens: int = typer.Option(128, "--gen-tokens", help="greedy tokens compared with the uncompressed model"),
        lengths: str | None = typer.Option(None, "--lengths",
                                           help="input lengths for the peak-memory sweep (default 2k..context)"),
        sweep: bool = typer.Option(True, "--sweep/--no-sweep", help="peak memory against input length"),
        floor: bool = typer.Option(True, "--floor/--no-floor",
                                   help="also a lossless cache prefilled in blocks: the fidelity rounding alone costs"),
        seed: int = typer.Option(0, "--seed"),
        threads: int = typer.Option(2, "--threads", help="torch CPU threads"),
        dtype: str = typer.Option("bfloat16", "--dtype",
                                  help="bfloat16 or float32 (the model's; budgets stay against bf16 bytes)"),
        prefill_block: int = typer.Option(512, "--prefill-block",
                                          help="memvisor methods prefill the context in blocks of this many tokens, "
                                               "compressing after each; 0: in one forward, as generate() does (each "
                                               "layer attends its whole context uncompressed, then compresses)"),
    ) -> None:
        """KV-cache compression under a byte budget vs kvpress and transformers' QuantizedCache (CPU)."""
        from memvisor.bench.kv_run import KvBenchConfig, run_kv_bench

        cfg = KvBenchConfig(
            model=model, out=out, budgets=[float(x) for x in _split_csv(budgets) or []] or None,
            methods=_split_csv(methods), peers=_split_csv(peers), tokens=tokens, samples=samples,
            gen_tokens=gen_tokens, lengths=[int(x) for x in _split_csv(lengths) or []] or None, seed=seed,
            threads=threads, sweep=sweep, floor=floor, dtype=dtype, prefill_block=prefill_block,
        )
        try:
            run_kv_bench(cfg, log=typer.echo)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from exc

    @bench_app.command("kv-gpu")
    def kv_gpu_cmd(
        out: Path = typer.Option(..., "--out", help="folder for results.json and table.md"),
        lengths: str = typer.Option("8192,16384,32768,65536", "--lengths", help="context lengths in tokens"),
        bits: str = typer.Option("2,4", "--bits", help="KIVI bit widths"),
        batch: int = typer.Option(1, "--batch"),
        layers: int = typer.Option(32, "--layers"),
        tune_length: int = typer.Option(32768, "--tune-length", help="length at which kernel settings are tuned"),
    ) -> None:
        """Fused KIVI decode attention vs the bf16 cache on a CUDA card (Llama-3.1-8B shapes, random data)."""
        from memvisor.bench.kv_gpu import GpuBenchConfig, parse_lengths, run_gpu_bench, table, write_results

        try:
            cfg = GpuBenchConfig(lengths=parse_lengths(lengths), bits=tuple(int(b) for b in bits.split(",")),
                                 batch=batch, layers=layers, tune_length=tune_length)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from exc
        res = run_gpu_bench(cfg, log=typer.echo)
        write_results(res, out)
        typer.echo(table(res))
