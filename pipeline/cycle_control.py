"""When to stop refining, decided the same way by the Prefect flow and by the report stage.

Stop when localisation (pointing game, or CAM energy in anatomy where a dataset has no boxes) has
not improved by `min_gain` for `patience` cycles, or when clean AUROC fell more than
`auroc_tolerance` below cycle 0. The served model is the best-localising cycle among those within
the AUROC tolerance (the later one on a tie): a cycle that stopped improving is not served over a
better earlier one.
"""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import FlowParams, Params, Paths
from pipeline.io import read_json

# a cycle the stop rule skipped: its metrics/scores hold {"cycle": k, STOPPED: why} and its other
# outputs are placeholders (pipeline/stages/common.py `skip_if_stopped`), so every stage of dvc.yaml
# ran and `dvc status` stays clean after an early stop
STOPPED = "stopped"


@dataclass
class Decision:
    stop: bool
    reason: str | None
    serve_cycle: int


def localisation_score(m: dict) -> float | None:
    return m.get("pointing_game") if m.get("pointing_game") is not None else m.get("cam_in_anatomy")


def decide(history: list[dict], rule: FlowParams) -> Decision:
    """`history`: per-cycle metrics dicts in cycle order (cycle 0 first)."""
    if not history:
        raise ValueError("no cycle has been evaluated yet")
    base_auroc = history[0].get("auroc_macro")
    best_loc, best_at, serve, serve_loc = None, 0, history[0]["cycle"], None
    for k, m in enumerate(history):
        auroc = m.get("auroc_macro")
        if k and base_auroc is not None and auroc is not None and auroc < base_auroc - rule.auroc_tolerance:
            return Decision(True, f"clean AUROC {auroc:.3f} fell more than {rule.auroc_tolerance} below "
                                  f"cycle 0's {base_auroc:.3f} at cycle {m['cycle']}", serve)
        loc = localisation_score(m)
        if serve_loc is None or (loc is not None and loc >= serve_loc):
            serve, serve_loc = m["cycle"], loc
        if loc is not None and (best_loc is None or loc >= best_loc + rule.min_gain):
            best_loc, best_at = loc, k
        elif k - best_at >= rule.patience:
            return Decision(True, f"localisation gained less than {rule.min_gain} for {rule.patience} "
                                  f"cycle(s) by cycle {m['cycle']}", serve)
    return Decision(False, None, serve)


def stop_reason_before(params: Params, paths: Paths, cycle: int) -> str | None:
    """Why `cycle` does not run: the stop rule fired on the cycles evaluated before it, or one of them
    was itself skipped. None: it runs. Every per-cycle stage asks this first, so `dvc repro` and the
    Prefect flow stop at the same cycle, and a stopped run leaves nothing for DVC to run."""
    history = []
    for k in params.cycle_ids():
        if k == cycle:
            break
        metrics = read_json(paths.cycle_metrics(k))
        if metrics.get(STOPPED):
            return metrics[STOPPED]
        history.append(metrics)
    decision = decide(history, params.flow)
    return decision.reason if decision.stop else None


def load_cycles(paths: Paths, cycle_ids: list[int], last_cycle: int | None = None) -> list[dict]:
    """Every evaluated cycle's full scores (scores.json), in cycle order, up to `last_cycle`: the history
    the report, the sanity checks and review_scores read."""
    out = []
    for k in cycle_ids:
        if last_cycle is not None and k > last_cycle:
            break
        f = paths.cycle_scores(k)
        if not f.is_file():
            break  # cycles run in order: the first missing one ends the history
        scores = read_json(f)
        if scores.get(STOPPED):
            break  # ... and so does the first one the stop rule skipped
        out.append(scores)
    return out
