"""The teacher-forced probe with sliding layers capped at a share F of their window (the rest of the
budget goes to the full-attention layers): the experiment that led to the split by span.
usage: python benchmarks/kv/probe_window_share.py F MODEL BUDGETS METHODS SAMPLES GEN_TOKENS"""
import sys, runpy
import memvisor.kv.cache as C
f = float(sys.argv.pop(1))
orig = C.split_layers
def patched(budget, costs, n, windows, lb, *rest):
    w2 = [None if w is None else max(2, int(f * (w - 1)) + 1) for w in windows]
    return orig(budget, costs, n, w2, lb, *rest)
C.split_layers = patched
runpy.run_path(__file__.replace("probe_window_share.py", "probe_teacher_forced.py"), run_name="__main__")
