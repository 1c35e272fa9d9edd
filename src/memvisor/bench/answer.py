"""Answer LoCoMo questions from a packed context through an OpenAI-compatible endpoint; score them.

Scoring follows LoCoMo's own evaluation code (snap-research/locomo, task_eval/evaluation.py):
- `normalize_answer`: drop commas, lowercase, strip punctuation, remove the words a/an/the/and,
  collapse whitespace;
- `f1_score`: token F1 over Porter-stemmed tokens (NLTK's PorterStemmer, as LoCoMo uses), with
  multiset overlap;
- per category: 1 (multi-hop) splits prediction and answer on commas and averages, over answer
  parts, the best F1 against any predicted part; 2 and 4 plain F1; 3 (open-domain) keeps the answer
  up to the first ';'; 5 (adversarial) scores 1 when the prediction says "no information available"
  or "not mentioned", else 0.
With no endpoint configured the answer step is skipped: nothing is faked.
"""
from __future__ import annotations

import json
import re
import string
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict

from memvisor.errors import MemvisorError, ModelUnavailable

ANSWER_PROMPT = (
    "You answer questions about a long conversation between two people, using only the memory "
    "excerpts below (each line: date, speaker, what was said).\n\nMemory:\n{context}\n\n"
    "Question: {question}\nAnswer in a few words. If the excerpts do not say, answer exactly: "
    "No information available.")
JUDGE_PROMPT = (
    "Grade an answer to a question about a conversation.\nQuestion: {question}\n"
    "Gold answer: {gold}\nGiven answer: {prediction}\n"
    "Reply with one word: CORRECT if the given answer means the same as the gold answer "
    "(dates may be written differently), otherwise WRONG.")


class EndpointError(MemvisorError, RuntimeError):
    """The OpenAI-compatible endpoint failed or answered something unreadable."""


_stemmer = None


def _stem(word: str) -> str:
    global _stemmer
    if _stemmer is None:
        try:
            from nltk.stem import PorterStemmer
        except ImportError as e:
            raise ModelUnavailable("LoCoMo's token F1 uses NLTK's PorterStemmer: "
                                   "pip install 'nltk>=3.8,<4'") from e
        _stemmer = PorterStemmer()
    return _stemmer.stem(word)


def normalize_answer(s: str) -> str:
    s = str(s).replace(",", "").lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the|and)\b", " ", s)
    return " ".join(s.split())


def f1_score(prediction: str, ground_truth: str) -> float:
    pred = [_stem(w) for w in normalize_answer(prediction).split()]
    gold = [_stem(w) for w in normalize_answer(ground_truth).split()]
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def f1_multi(prediction: str, ground_truth: str) -> float:
    preds = [p.strip() for p in prediction.split(",")]
    golds = [g.strip() for g in ground_truth.split(",")]
    return sum(max(f1_score(p, g) for p in preds) for g in golds) / len(golds)


def locomo_score(prediction: str, answer: str, category: int) -> float:
    """LoCoMo's per-category answer score in [0, 1]."""
    if category == 5:
        low = prediction.lower()
        return 1.0 if ("no information available" in low or "not mentioned" in low) else 0.0
    if category == 3:
        answer = answer.split(";")[0].strip()
    if category == 1:
        return f1_multi(prediction, answer)
    return f1_score(prediction, answer)


class AnswerScores:
    """Mean LoCoMo F1 (and judge accuracy) per category; `overall` over categories 1-4."""

    def __init__(self) -> None:
        self._f1: dict[str, list[float]] = defaultdict(list)
        self._judge: dict[str, list[float]] = defaultdict(list)

    def add(self, category: int, prediction: str, answer: str, judged: bool | None) -> None:
        self._f1[str(category)].append(locomo_score(prediction, answer, category))
        if judged is not None:
            self._judge[str(category)].append(1.0 if judged else 0.0)

    @staticmethod
    def _table(per: dict[str, list[float]]) -> dict[str, float | None]:
        def mean(xs):
            return round(sum(xs) / len(xs), 4) if xs else None
        out = {"overall": mean([v for c in "1234" for v in per.get(c, [])])}
        out.update({c: mean(per.get(c, [])) for c in "12345"})
        return out

    def summary(self) -> dict:
        out = {"f1": self._table(self._f1)}
        if self._judge:
            out["judge_accuracy"] = self._table(self._judge)
        return out


class Answerer:
    """Chat completions over plain HTTP (urllib: no client library), temperature 0."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None,
                 judge_model: str | None = None, timeout_s: float = 120.0, max_tokens: int = 64):
        if not base_url.startswith(("http://", "https://")):
            raise EndpointError(f"--llm-base-url must start with http:// or https://, got {base_url!r}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key = api_key
        self.judge_model = judge_model
        self.judging = judge_model is not None
        self.timeout_s = timeout_s
        self.max_tokens = max_tokens

    def _chat(self, model: str, prompt: str) -> str:
        body = json.dumps({"model": model, "temperature": 0, "max_tokens": self.max_tokens,
                           "messages": [{"role": "user", "content": prompt}]}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last: Exception | None = None
        for attempt in range(3):  # transient failures (5xx, resets) are retried, bounded
            req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                    data = json.loads(r.read().decode())
                return str(data["choices"][0]["message"]["content"] or "").strip()
            except urllib.error.HTTPError as e:
                last = e
                if e.code < 500:
                    break
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                last = e
            except (KeyError, IndexError, TypeError, json.JSONDecodeError) as e:
                raise EndpointError(f"{self.url} answered without choices[0].message.content: {e}") from e
            time.sleep(0.5 * (attempt + 1))
        raise EndpointError(f"{self.url} failed: {last}")

    def answer(self, question: str, context: str) -> str:
        return self._chat(self.model, ANSWER_PROMPT.format(context=context, question=question))

    def judge(self, question: str, gold: str, prediction: str) -> bool:
        reply = self._chat(self.judge_model or self.model,
                           JUDGE_PROMPT.format(question=question, gold=gold, prediction=prediction))
        return reply.strip().upper().startswith("CORRECT")
