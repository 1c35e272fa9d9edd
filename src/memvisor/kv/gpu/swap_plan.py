"""How the swap decode kernel (gluon_kivi_swap.py) splits a layer's units over its programs (pure Python, so the
choice is testable without a GPU). A unit is 16 token slots of a planes tile; a program of one warp takes
``ups`` consecutive units of one kv head; ``bh`` kv heads; ``sm_count`` SMs of which each holds at most
``resident`` programs at once."""

from __future__ import annotations

# programs of the swap kernel that fit on one SM at once (H100/H200, staged, sm_90 build), by (bits, head_dim,
# warps): 28 KB of shared memory per 1-warp program for 2-bit codes at head_dim 128 (7 per SM), 22.5 KB and 168
# registers for 4-bit ones (9), 57 and 45 KB at head_dim 256 (3, 4); other shapes assume 4 (a wrong guess costs
# speed only)
SWAP_RESIDENT = {(2, 128, 1): 7, (4, 128, 1): 9, (2, 256, 1): 3, (4, 256, 1): 4}
# programs per SM that the pipelined plan (below) aims for, by (bits, head_dim, warps): the shapes where it was
# measured (H100, Llama-3.1-8B heads); others use the resident plan
PIPELINE_WAVES = {(2, 128, 1): 7.0, (4, 128, 1): 8.0}
# the even pipelined plan (below) by (bits, head_dim, warps): programs per SM wanted and at most; where it exists it
# replaces pipeline_plan
EVEN_WAVES = {(2, 128, 1): (6.0, 6.9)}


def swap_plan(bh: int, units: int, sm_count: int, resident: int) -> tuple[int, int]:
    """(splits, units per split): every program resident at once (at most ``resident`` per SM), about 4 programs
    per SM or more where the work allows (fewer leave the SM waiting on memory), and among those the fewest units
    on the busiest SM (programs spread evenly), ties to more units per program (the next unit's copy overlaps the
    current one's work). H100, 2-bit at 32k tokens: 4 units x 512 programs ran in 576 us per step, 3 x 688 in
    688 (busiest SM: 16 against 18 units)."""
    if units <= 0:
        return 0, 1
    plans = []
    for ups in range(1, units + 1):
        n_split = -(-units // ups)
        programs = bh * n_split
        if programs <= resident * sm_count:
            plans.append((-(-programs // sm_count) * ups, -ups, n_split, programs))
    if not plans:  # more kv heads than resident programs: one split each
        return 1, units
    busy = [p for p in plans if p[3] >= 3.5 * sm_count] or [max(plans, key=lambda p: p[3])]
    _, neg_ups, n_split, _ = min(busy)
    return n_split, -neg_ups


def pipeline_plan(bh: int, units: int, sm_count: int, waves: float, min_units: int = 3) -> tuple[int, int] | None:
    """(splits, units per split) for launches chained by programmatic dependent launch with every launch letting
    the next one start at once (pdl.py), so that the next layer's programs land in the SM slots this layer leaves
    free and then in those its finished programs free: about ``waves`` programs per SM (``ceil(waves sm_count /
    bh)`` splits wanted, whole units each), at least ``min_units`` units per program; None where the programs
    would be smaller. H100, us per step (KIVI-2 waves 7, KIVI-4 waves 8): 32k tokens, KIVI-2 688 programs of 3
    units 453.1 (the resident plan, 512 of 4, without the pipelined triggers: 479.9), KIVI-4 1024 of 4 640.4
    (661.6); 64k, KIVI-2 824 of 5 773.1 (688 of 6: 815.9; resident plan 781.8), KIVI-4 1024 of 8 1125.9 (1176
    of 7: 1405; resident plan 1183.9); programs of 1 or 2 units gain nothing (KIVI-4 at 8k, 1024 of 1: 347.6
    against 286.8; 16k, 1024 of 2: 419.8 against 418.2) (BENCHMARKS.md kv-gpu, session 7)."""
    if units <= 0:
        return None
    want = -(-int(waves * sm_count) // max(bh, 1))
    ups = -(-units // want)
    if ups < min_units:
        return None
    return -(-units // ups), ups


def even_plan(bh: int, units: int, sm_count: int, waves: float, max_waves: float, min_units: int = 3) -> int | None:
    """Splits for the pipelined launches (as pipeline_plan) with the units spread evenly (each split takes the floor
    or the ceiling of ``units / splits``, gluon_kivi_swap.py ``EVEN``): a program's time is set by its unit count,
    so the busiest program takes as few units as ``max_waves`` programs per SM allow, and among the split counts
    that achieve it, about ``waves`` programs per SM if that count does, else ``max_waves``. None where the busiest
    program would take fewer than ``min_units`` units. H100, KIVI-2, us per step: 32k tokens 792 programs (2-3
    units) 429.8-430.5, 912 430.3-434.2, 688 of 3 (pipeline_plan) 438.0-440.1, 664 (3-4 units) 495.1; 64k 912
    (4-5 units) 744.4-745.0, 864 751.8, 824 of 5 767.1, 792 (5-6 units) 816.7 (BENCHMARKS.md kv-gpu, session 8)."""
    if units <= 0:
        return None
    cap = min(units, -(-int(max_waves * sm_count) // max(bh, 1)))
    busiest = -(-units // cap)
    if busiest < min_units:
        return None
    want = -(-int(waves * sm_count) // max(bh, 1))
    return want if want <= cap and -(-units // want) == busiest else cap
