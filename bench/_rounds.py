"""Timing shared by the benches that race several built states on the same batches."""

from __future__ import annotations

import time

from functrain.steps import step


def ratios(ctx, states: dict, batches: list, rounds: int, baseline: str) -> dict[str, list[float]]:
    """Per round, each state's time for `batches` over the baseline's, in a rotated order.

    Every name runs once to warm up; round r starts at name r mod the count, so no state is
    always first. `states` is advanced in place (each entry is the state's newest value).
    """

    def run(name: str) -> float:
        ctx.barrier()
        t = time.perf_counter()
        for batch in batches:
            states[name] = step(states[name], batch)
        float(states[name].metrics["loss"])  # wait for the last step
        ctx.barrier()
        return time.perf_counter() - t

    names = list(states)
    for name in names:
        run(name)
    out: dict[str, list[float]] = {name: [] for name in names if name != baseline}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        times = {name: run(name) for name in order}
        for name in out:
            out[name].append(times[name] / times[baseline])
    return out
