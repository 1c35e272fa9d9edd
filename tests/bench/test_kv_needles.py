"""The synthetic needle generator: exact lengths, needles present once, deterministic, answers checked."""

import pytest

from memvisor.bench.kv_needles import answer_found, make_task, task_kinds


def _words(text: str) -> int:  # a stand-in tokenizer: whitespace words
    return len(text.split())


@pytest.mark.parametrize("kind,n_needles", [("single", 1), ("multikey", 4), ("multivalue", 3)])
def test_task_has_exact_length_and_its_needles(kind, n_needles):
    task = make_task(kind, 600, _words, seed=3)
    assert 560 <= _words(task.context) <= 600  # the largest haystack within the budget
    assert task.context.count("special magic number for") == n_needles
    for value in task.answers:
        assert f": {value}." in task.context
    asked = task.question.split("for ")[1].split(" mentioned")[0]
    # the answer prefix is the needle's own words up to its value (the model copies what follows)
    assert task.answer_prefix == f"The special magic number for {asked} is:"
    assert all(f"{task.answer_prefix} {v}." in task.context for v in task.answers)
    assert all(0.1 <= d <= 0.9 for d in task.depths)


def test_deterministic_and_seed_dependent():
    a = make_task("multikey", 400, _words, seed=1)
    b = make_task("multikey", 400, _words, seed=1)
    c = make_task("multikey", 400, _words, seed=2)
    assert a.context == b.context and a.answers == b.answers
    assert a.context != c.context


def test_multikey_distractors_have_other_keys_and_values():
    task = make_task("multikey", 500, _words, seed=5)
    assert len(set(task.keys)) == 4
    words = [w for k in task.keys for w in k.split("-")]
    assert len(set(words)) == 8  # keys share no word
    others = [line for line in task.context.split(". ") if "magic number for" in line and task.answers[0] not in line]
    assert len(others) == 3
    # the asked key is the one whose needle holds the answer
    assert task.asked in task.keys and task.asked in task.question
    assert f"for {task.asked} is: {task.answers[0]}" in task.context


def test_values_have_seven_digits_and_no_adjacent_repeat():
    for seed in range(20):
        for v in make_task("multivalue", 300, _words, seed=seed).answers:
            assert len(v) == 7 and v.isdigit() and all(a != b for a, b in zip(v, v[1:]))


def test_answer_check_and_kinds():
    assert answer_found(" 4821 937 is the number", ["4821937"])
    assert answer_found("It is 4821937.", ["4821937"])
    assert not answer_found("It is 4821936.", ["4821937"])
    assert task_kinds(4) == ["single", "multikey", "multivalue", "single"]
    with pytest.raises(ValueError):
        make_task("nope", 400, _words, seed=0)
    with pytest.raises(ValueError):
        make_task("single", 10, _words, seed=0)


class _WordTokenizer:
    """Whitespace words as tokens, the call shape of a transformers tokenizer (no chat template)."""

    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        import torch

        ids = list(range(len(text.split())))
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}


def test_prompts_record_where_the_asked_needle_sits_in_tokens():
    """``Prompt.depths`` = tokens before each occurrence of the asked key's needle / context tokens, the
    instruction head included: one depth for single and multikey tasks, three for multivalue."""
    from memvisor.bench.kv_run import KvBenchConfig, build_prompts

    tok = _WordTokenizer()
    prompts = build_prompts(tok, KvBenchConfig(model="smollm2", tokens=500, samples=3, gen_tokens=4, out="/tmp/x"))
    assert [len(p.depths) for p in prompts] == [1, 1, 3]
    head = "Read the text below and answer the question at the end.\n\n"
    for i, p in enumerate(prompts):
        task = make_task(p.kind, 500 - len(head.split()), _words, seed=i)
        words = (head + task.context).split()
        at = [j for j in range(len(words) - 1) if words[j] == "for" and words[j + 1] == task.asked]
        assert p.depths == [round(j / len(words), 3) for j in at] and p.ctx.shape[1] == len(words)
