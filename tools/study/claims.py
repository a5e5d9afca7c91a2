"""The claims from a study's seed means: (a) the final student beats random initialisation, (b) no bootstrapped
stage loses to the stage before, (c) the spread between first targets shrinks over the stages; (d) in
`studies.run_wider`."""

from __future__ import annotations


def summarize(values: list[float]) -> dict:
    return {"mean": sum(values) / len(values), "seeds": list(values)}


def spread(protocol: dict, stage: int) -> float:
    means = [stages[stage]["mean"] for stages in protocol["targets"].values()]
    return max(means) - min(means)


def claims(summary: dict) -> dict:
    """(a) final student - random init per target; (b) stage k - stage k-1 per target; (c) spread between
    first targets at the first and the last stage. Differences of seed means, per protocol."""
    out = {}
    for name, p in summary["protocols"].items():
        rand = p["random_init"]["mean"]
        gain = {t: s[-1]["mean"] - rand for t, s in p["targets"].items()}
        steps = {t: [s[k]["mean"] - s[k - 1]["mean"] for k in range(1, len(s))] for t, s in p["targets"].items()}
        n = len(next(iter(p["targets"].values())))
        entry = {
            "a_final_minus_random": gain,
            "a": all(g > 0 for g in gain.values()),
            "b_stage_minus_previous": steps,
            "b": all(d >= 0 for v in steps.values() for d in v) if n > 1 else None,
        }
        if len(p["targets"]) > 1 and n > 1:
            entry["c_spread_first_last"] = [spread(p, 0), spread(p, n - 1)]
            entry["c"] = spread(p, n - 1) < spread(p, 0)
        out[name] = entry
    return out


def verdict(ok) -> str:
    return "holds" if ok else "does not hold"
