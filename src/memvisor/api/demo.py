"""`memvisor demo`: the main job on a fresh install, end to end and offline.

Ingest a bundled conversation into an embedded home, then for each question: pack the memories that
fit the token budget, show the evidence with its sources and the budget use, and answer with the
local SmolLM2-135M-Instruct (a 135M model: expect short, sometimes wrong answers; the evidence is the point).
"""
from __future__ import annotations

import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.panel import Panel

from memvisor.api.memory import Memory

QUESTIONS = (
    "Where did Ana move for her new job?",
    "Why did Ben switch from the half marathon to the 10k?",
    "How long did Ben take to finish the 10k in Annecy?",
)
# v2: "copy names and numbers exactly" (v1 let SmolLM2 invent names absent from the context).
PROMPT_VERSION = "answer.v2"


def answer_prompt(context_text: str, question: str) -> list[dict[str, str]]:
    system = resources.files("memvisor").joinpath(f"prompts/{PROMPT_VERSION}.txt").read_text().strip()
    user = f"Notes:\n<<<\n{context_text}\n>>>\n\nQuestion: {question}"
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


class LocalAnswerer:
    """Greedy answers from the packaged SmolLM2 (converted once from GGUF to a cached folder)."""

    def __init__(self) -> None:
        import torch

        from memvisor.kv.models import load_local_model

        torch.set_num_threads(max(1, torch.get_num_threads()))
        self._torch = torch
        self.model, self.tokenizer = load_local_model("smollm2", kv_attention=False)

    def answer(self, context_text: str, question: str, max_new_tokens: int = 48) -> str:
        ids = self.tokenizer.apply_chat_template(answer_prompt(context_text, question), add_generation_prompt=True,
                                                 return_tensors="pt", return_dict=True)
        with self._torch.inference_mode():
            out = self.model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                      pad_token_id=self.tokenizer.eos_token_id)
        return self.tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def run_demo(home: Path | None, budget: int, console: Console, progress_bar: Callable) -> None:
    tmp = None
    if home is None:
        tmp = tempfile.TemporaryDirectory(prefix="memvisor-demo-")
        home = Path(tmp.name)
    try:
        _run(home, budget, console, progress_bar)
    finally:
        if tmp is not None:
            tmp.cleanup()


def _run(home: Path, budget: int, console: Console, progress_bar: Callable) -> None:
    from memvisor.text.formats import load_conversations

    source = resources.files("memvisor").joinpath("data/demo_conversation.jsonl")
    with resources.as_file(source) as path:
        conversations = load_conversations(path)
    console.print(f"[bold]memvisor demo[/] · home {home} · token budget {budget} per question")
    with Memory(home) as memory:
        with progress_bar() as bar:
            task = bar.add_task("ingesting the demo conversation", total=sum(len(c.turns) for c in conversations))
            report = memory.ingest(conversations, namespace="demo", progress=lambda n: bar.advance(task, n))
        console.print(f"stored {report.added} turns as episodic memories (SQLite + FTS5 + vector index)")
        console.print("loading the local SmolLM2-135M-Instruct (first run converts the packaged GGUF once)...")
        started = time.perf_counter()
        answerer = LocalAnswerer()
        console.print(f"model ready in {time.perf_counter() - started:.1f} s")
        for question in QUESTIONS:
            ctx = memory.context(question, namespace="demo", budget_tokens=budget)
            started = time.perf_counter()
            reply = answerer.answer(ctx.text, question)
            seconds = time.perf_counter() - started
            sources = ", ".join(f"{c.memory_id}←{'/'.join(c.sources)}" for c in ctx.citations)
            console.print(Panel(ctx.text, title=f"Q: {question}",
                                subtitle=f"{ctx.tokens}/{budget} tokens · {len(ctx.citations)} memories",
                                title_align="left", subtitle_align="right"), highlight=False)
            console.print(f"  [dim]sources (memory←turn):[/] {sources}", highlight=False)
            console.print(f"  [bold green]answer[/] ({seconds:.1f} s): {reply}\n", highlight=False)
