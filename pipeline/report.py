"""The run's report: reports/summary.json, reports/index.html with pictures, models/latest.json.

index.html carries its pictures inside it (data: URIs): copied alone, it still shows everything; its
links to the CSV files beside it stay links."""
from __future__ import annotations

import base64
import html
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import figures
from pipeline.audit import audit_note, read_audit_summary
from pipeline.config import Params, Paths
from pipeline.curves import read_curves
from pipeline.cycle_control import decide, load_cycles
from pipeline.data.manifest import label_matrix
from pipeline.data.store import ArrayStore
from pipeline.io import read_json, write_json, write_text
from pipeline.metrics.sanity import SANITY_MAX
from pipeline.scores import SANITY_CHECKS, CycleScores, sanity_lines, verdict

log = logging.getLogger(__name__)

def summary(params: Params, cycles: list[dict], stop_reason: str | None, audit: dict | None = None) -> dict:
    """reports/summary.json; with the shortcut audit on, its settings and the marker figures per cycle."""
    audit = audit or {"enabled": False}
    return {
        "dataset": params.data.source,
        "labels": cycles[0]["labels"] if cycles else [],
        "cycles": [{**CycleScores.of(c).summary_entry(bool(audit.get("enabled"))), "per_label": c.get("per_label", {})}
                   for c in cycles],
        "stop_reason": stop_reason,
        "audit": audit,
    }


def format_table(cycles: list[dict]) -> str:
    """The per-cycle table printed by `make run` and shown in the report."""
    head = ["cycle", *CycleScores.TABLE]
    lines = [" ".join(f"{h:>16}" if i else f"{h:>5}" for i, h in enumerate(head))]
    for c in cycles:
        cells = [f"{c['cycle']:>5}"] + [f"{'-' if c.get(k) is None else format(c[k], '.3f'):>16}"
                                        for k in CycleScores.TABLE]
        lines.append(" ".join(cells))
    return "\n".join(lines)


_STYLE = ("<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto}"
          "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
          "img{max-width:100%}</style>")


def _img(path: Path) -> str:
    """An <img> carrying the PNG at `path` in the page itself."""
    return f"<img src='data:image/png;base64,{base64.b64encode(Path(path).read_bytes()).decode('ascii')}'>"


def _html_verdict(text: str) -> str:
    """Escaped text with a failed verdict in red."""
    return html.escape(text).replace(verdict(False), f"<b style='color:#b00'>{verdict(False)}</b>")


def _sanity_cell(c: dict) -> str:
    passed = CycleScores.of(c).sanity_passed
    return "—" if passed is None else _html_verdict(verdict(passed))


def _html_sanity(sanity: dict | None, serve: int) -> str:
    """The sanity_lines, each check's figure at every cycle, and what the permuted-label twin learned."""
    esc = html.escape
    if not sanity:
        return ("<h2>Saliency sanity checks</h2><p>Not run: <code>reports/sanity.json</code> is missing "
                "(the <code>sanity</code> stage).</p>")
    lines = "".join(f"<li>{_html_verdict(line)}</li>" for line in sanity_lines(sanity))
    rows = "".join(
        f"<tr><td style='text-align:left'>{esc(name)}</td><td style='text-align:left'>"
        + esc(", ".join(f"{k}: {'—' if v is None else f'{v:.3f}'}"
                        for k, v in ((sanity.get(key) or {}).get("by_cycle") or {}).items())) + "</td></tr>"
        for key, name, _ in SANITY_CHECKS)
    lp = sanity.get("label_permutation") or {}
    twin = ""
    if lp.get("twin_val_loss") is not None and lp.get("prevalence_val_loss") is not None:
        learned = lp["twin_val_loss"] < lp["prevalence_val_loss"] - 0.005
        twin = (f" The permuted-label twin has cycle 0's architecture, init and images (permutation seed "
                f"{lp['seed']}); its val loss on the true labels is "
                + ("<b>lower</b> than predicting each label's rate, so the permutation did not destroy every cue."
                   if learned else "no lower than predicting each label's rate: the permutation left nothing to learn.")
                + (f" Its val AUROC {lp['twin_val_auroc']:.3f} (the untrained network's: "
                   f"{lp['untrained_val_auroc']:.3f}) reflects image statistics, not labels."
                   if lp.get("twin_val_auroc") is not None and lp.get("untrained_val_auroc") is not None else ""))
    stale = (f" <b style='color:#b00'>These checks were run for cycle {sanity['served_cycle']}, not the served "
             f"cycle {serve}: re-run the sanity stage.</b>" if sanity.get("served_cycle") != serve else "")
    return (f"<h2>Saliency sanity checks</h2><p>Adebayo et al.: heatmaps that explain the model must change when "
            f"what it learned is destroyed. Rank correlation of the served model's heatmaps (cycle "
            f"{sanity.get('served_cycle')}, {sanity.get('n_images')} test images, {esc(str(sanity.get('cam_method')))}) "
            f"with those of a fully randomised copy and of a twin trained on permuted labels; each check passes "
            f"below {sanity['max']}.{twin}{stale}</p><ul>{lines}</ul>"
            "<table><tr><th>check</th><th>rank corr at every cycle</th></tr>" + rows + "</table>")


def _html_review(review: dict | None) -> str:
    """reports/review.json: each cycle against the clinicians' marks, and the reviewers against each other."""
    if not review:
        return ""
    fmt = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    keys = ("pointing_game_reviewed", "iou_reviewed", "agreement_with_reviewers", "kappa_with_reviewers")
    head = "".join(f"<th>{k}</th>" for k in ("cycle", *keys, "evidence boxes", "reviewed calls"))
    rows = "".join(f"<tr><td>{c['cycle']}</td>" + "".join(f"<td>{fmt(c.get(k))}</td>" for k in keys)
                   + f"<td>{c.get('n_evidence_boxes', 0)}</td><td>{c.get('n_reviewed_calls', 0)}</td></tr>"
                   for c in review.get("cycles", []))
    between = review.get("between_reviewers") or {}
    kappa = between.get("mean_kappa_call")
    return (f"<h2>Clinician review</h2><p>{review['n_marks']} marks by {review['n_reviewers']} reviewer(s) "
            f"(<code>data/feedback</code>). Localisation on the reviewers' evidence boxes, and each cycle's calls "
            f"against the calls the reviewers confirmed or corrected (agreement, Cohen's κ). Between reviewers: "
            f"mean κ {fmt(kappa)} over {len(between.get('pairs', []))} pair(s) sharing films.</p>"
            f"<table><tr>{head}</tr>{rows}</table>")


def _html_anatomy_masks(seg: dict, paths: Paths) -> str:
    """The plausibility checks' counts and the per-split previews the segment stage drew
    (Paths.segment_preview): what a dataset without ground-truth masks offers instead of a Dice."""
    if "implausible" not in seg:
        return ""
    esc = html.escape
    by_split = ", ".join(f"{esc(k)}: {v}" for k, v in (seg.get("implausible_by_split") or {}).items())
    splits = [name.removeprefix("preview_").removesuffix(".png") for name in seg.get("previews", [])]
    pics = "".join(f"<h3>{esc(split)}</h3>{_img(paths.segment_preview(split))}" for split in splits)
    return (f"<h2>Anatomy masks</h2><p>Every predicted mask was cleaned (the two largest lung components and "
            f"the largest heart component kept; {seg['blobs_removed']} films lost blobs) and checked for "
            f"plausibility (two lungs side by side, lung and heart areas in range, heart inside the thorax): "
            f"<b>{seg['implausible']}</b> of {seg.get('n_checked', '?')} are implausible"
            + (f" ({by_split})" if by_split else "")
            + (" — see <a href='segment/implausible.csv'>segment/implausible.csv</a>" if seg["implausible"] else "")
            + ". They are left out of <i>cam_in_anatomy</i>, and the enhancement uses the population prior "
              "anatomy in their place. Cyan: lungs, red: heart; implausible films are framed in red.</p>" + pics)


def _html_table(cycles: list[dict]) -> str:
    head = "".join(f"<th>{html.escape(k)}</th>" for k in ("cycle", *CycleScores.TABLE, "sanity check"))
    body = "".join("<tr>" + f"<td>{c['cycle']}</td>" + "".join(
        f"<td>{'—' if c.get(k) is None else f'{c[k]:.3f}'}</td>" for k in CycleScores.TABLE)
        + f"<td>{_sanity_cell(c)}</td></tr>" for c in cycles)
    return f"<table><tr>{head}</tr>{body}</table>"


def _grid_images(paths: Paths, image_ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    manifest = pd.read_parquet(paths.manifest)
    pos = {iid: i for i, iid in enumerate(manifest["image_id"])}
    idx = np.asarray([pos[i] for i in image_ids], dtype=np.int64)
    return ArrayStore(paths.images).read(idx), idx


def build_report(params: Params, paths: Paths, stop_reason: str | None = None,
                 last_cycle: int | None = None) -> dict:
    """Write summary.json, latest.json, figures and index.html from the evaluated cycles (up to last_cycle)."""
    cycles = load_cycles(paths, params.cycle_ids(), last_cycle)
    if not cycles:
        raise ValueError("no evaluated cycle found under reports/cycles; run the evaluate stages first")
    decision = decide(cycles, params.flow)
    if stop_reason is None:
        stop_reason = decision.reason or f"completed all {len(cycles) - 1} refinement cycles"
    result = summary(params, cycles, stop_reason, read_audit_summary(paths.audit_summary))
    labels = result["labels"]
    fig_dir = paths.figures

    manifest = pd.read_parquet(paths.manifest)
    grids = {c["cycle"]: np.load(paths.cycle_grid(c["cycle"])) for c in cycles}
    first, last = cycles[0]["cycle"], cycles[-1]["cycle"]
    image_ids = [str(i) for i in grids[first]["image_ids"]]
    pictures: list[tuple[str, Path]] = []
    if image_ids:
        imgs, idx = _grid_images(paths, image_ids)
        truth = label_matrix(manifest, labels)[idx]
        for c in grids:  # drawn by each cycle's evaluate stage
            pictures.append((f"Cycle {c}: heatmaps of the fixed test images", paths.cycle_cam_grid(c)))
        figures.save_before_after_cams(fig_dir / "before_after.png", imgs, grids[first]["cams"],
                                       grids[last]["cams"], truth, labels, first, last)
        pictures.insert(0, ("Before / after: cycle 0 vs the latest cycle", fig_dir / "before_after.png"))
    figures.save_trends(fig_dir / "trends.png", cycles, list(CycleScores.TABLE))
    pictures.insert(0, ("Scores across cycles (unmodified test images)", fig_dir / "trends.png"))
    rocs = {c["cycle"]: read_curves(paths.cycle_roc(c["cycle"]), "roc", labels) for c in cycles}
    for split in ("test", "test_shifted"):
        if split in rocs[first]:
            figures.save_roc(fig_dir / f"roc_{split}.png", rocs, split)
            pictures.append((f"ROC on {split}", fig_dir / f"roc_{split}.png"))
    for c in (first, last):
        figures.save_confusions(fig_dir / f"confusion_c{c}.png", cycles[c - first]["per_label"], labels, c)
        pictures.append((f"Cycle {c}: confusion matrices at the val-chosen thresholds", fig_dir / f"confusion_c{c}.png"))
    histories = {c["cycle"]: pd.read_csv(p) for c in cycles
                 if (p := paths.train_history(c["cycle"])).is_file()}
    if histories:
        figures.save_loss_curves(fig_dir / "loss_curves.png", histories)
        pictures.append(("Loss curves (train and unmodified val)", fig_dir / "loss_curves.png"))

    seg = paths.segment_metrics
    seg_scores = read_json(seg) if seg.is_file() else None
    enhance_stats = {c["cycle"]: read_json(p) for c in cycles[1:]
                     if (p := paths.enhance_stats(c["cycle"])).is_file()}
    result["segmentation"] = seg_scores
    result["quarantined"] = len(pd.read_csv(paths.quarantine)) if paths.quarantine.is_file() else 0
    result["sanity"] = read_json(paths.sanity) if paths.sanity.is_file() else None
    # the clinicians' marks against every cycle (stage review_scores), only once there are marks
    review = read_json(paths.review_scores) if paths.review_scores.is_file() else None
    if review and review.get("n_marks"):
        result["review"] = review
    if result["sanity"] and result["sanity"].get("served_cycle") != decision.serve_cycle:
        log.warning("reports/sanity.json checked cycle %s, the served cycle is %d: re-run the sanity stage",
                    result["sanity"].get("served_cycle"), decision.serve_cycle)
    write_json(paths.summary, result)
    trends = pd.DataFrame([CycleScores.of(c).headline() for c in cycles])[list(CycleScores.TRENDS)]
    write_text(paths.trends, trends.to_csv(index=False))
    serve = cycles[[c["cycle"] for c in cycles].index(decision.serve_cycle)]
    write_json(paths.latest, {"cycle": serve["cycle"], "checkpoint": serve["model"]["path"],
                              "sha256": serve["model"]["sha256"], "baseline": cycles[0]["model"]["path"],
                              "metrics": CycleScores.of(serve).headline(), "model": serve["model"],
                              "stop_reason": stop_reason})
    write_text(paths.report_html,
               _html(params, paths, result, cycles, pictures, seg_scores, enhance_stats, decision.serve_cycle))
    log.info("report written: %d cycles, serving c%d; %s", len(cycles), decision.serve_cycle, stop_reason)
    return result


def _html(params: Params, paths: Paths, result: dict, cycles: list[dict], pictures, seg, enhance_stats,
          serve) -> str:
    esc = html.escape
    parts = [
        "<!doctype html><meta charset='utf-8'><title>CXR refinement report</title>", _STYLE,
        f"<h1>Refinement report — {esc(result['dataset'])}</h1>",
        f"<p>Labels: {esc(', '.join(result['labels']))}. Enhancement policy: <b>{esc(params.enhance.policy)}</b>. "
        f"Stop: {esc(result['stop_reason'])}. Served model: cycle {serve}. "
        f"Files quarantined (unreadable, left out): {result['quarantined']}"
        + (" — see <a href='quarantine.csv'>quarantine.csv</a>" if result["quarantined"] else "") + ".</p>",
        "<p>Every figure is measured on <b>unmodified</b> test images. <i>accuracy_shifted</i> is accuracy on "
        "<code>test_shifted</code>, where a planted shortcut (phantom) disagrees with the label; "
        "<i>shortcut_gap</i> = accuracy − accuracy_shifted. <i>pointing_game</i>: share of positive findings "
        "whose heatmap peak falls in the ground-truth box; <i>cam_in_anatomy</i>: share of heatmap energy in "
        "the label's anatomy (lungs, or heart for cardiomegaly); <i>sanity_rank_corr</i>: rank correlation "
        f"with a randomised model's heatmaps; the check passes below {SANITY_MAX} (Adebayo et al.).</p>",
        _html_table(cycles),
        _html_sanity(result.get("sanity"), serve),
        _html_review(result.get("review")),
    ]
    note = audit_note(result.get("audit"))
    if note:
        marker = "; ".join(f"c{c['cycle']}: peak on the marker {c['marker_pointing']:.3f}"
                           for c in cycles if c.get("marker_pointing") is not None)
        parts.insert(3, f"<p><b>{esc(note)}</b> {esc(marker)}</p>")
    if seg:
        fmt = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
        rows = "".join(f"<tr><td>{esc(name)}</td><td>{fmt(v['dice'])}</td><td>{fmt(v['iou'])}</td></tr>"
                       for name, v in seg["val"].items() if isinstance(v, dict))
        at = (f" at {seg['val']['resolution']} px (the masks' own resolution; the U-Net runs at {seg.get('size')} px)"
              if seg["val"].get("resolution") else "")
        parts.append(f"<h2>Anatomy U-Net</h2><p>Trained on {seg['n_train']} images with masks from "
                     f"{esc(', '.join(seg.get('sources', [])))}; scored on {seg['val']['n_images']} held-out "
                     f"images{esc(at)}.</p><table><tr><th>structure</th><th>Dice</th><th>IoU</th></tr>{rows}</table>")
        parts.append(_html_anatomy_masks(seg, paths))
    for c, st in enhance_stats.items():
        sep = "; ".join(f"{lab}: mean-in-anatomy AUROC raw {v['raw'].get('mean_in_anatomy')} → enhanced "
                        f"{v['enhanced'].get('mean_in_anatomy')}" for lab, v in st.get("separability", {}).items())
        parts.append(f"<h3>Enhancement c{c} ({esc(st['policy'])})</h3><p>CAM energy in anatomy "
                     f"{st.get('mean_cam_in_anatomy')}; decorrelated-first area {st.get('hot_fraction'):.3f}. "
                     f"Class separability by simple statistics: {esc(sep)}</p>"
                     f"{_img(paths.enhance_figures(c) / 'atlas.png')} {_img(paths.enhance_figures(c) / 'examples.png')}")
    for title, path in pictures:
        parts.append(f"<h2>{esc(title)}</h2>{_img(path)}")
    return "\n".join(parts)


def build_policy_comparison(params: Params, paths: Paths, results: dict[str, list[dict]],
                            name: str = "policies", exp_prefix: str = "policy-", extra: dict | None = None) -> dict:
    """reports/<name>/: the same cycle run under each enhancement policy, scored on unmodified images.

    `results`: policy -> per-cycle headline metrics (as in reports/cycles/cK/metrics.json); `extra`
    joins summary.json (the real-data run's targets and timing).
    """
    out_dir = paths.comparison(name)
    summary = {"dataset": params.data.source, "default_policy": params.enhance.policy,
               "policies": {policy: {"cycles": [CycleScores.of(c).headline() for c in cycles]}
                            for policy, cycles in results.items()},
               **(extra or {})}
    write_json(paths.comparison_summary(name), summary)
    figures.save_policy_comparison(out_dir / "comparison.png", results, list(CycleScores.POLICY))
    esc = html.escape
    parts = ["<!doctype html><meta charset='utf-8'><title>Enhancement policies</title>", _STYLE,
             f"<h1>Enhancement policies — {esc(params.data.source)}</h1>",
             "<p>The same data and cycle 0 model, refined under each policy (DVC experiments "
             f"<code>{esc(exp_prefix)}&lt;policy&gt;</code>; <code>dvc exp show</code> lists them). "
             "Every score is measured on "
             f"<b>unmodified</b> test images.</p>{_img(out_dir / 'comparison.png')}"]
    for policy, cycles in results.items():
        parts += [f"<h2>{esc(policy)}</h2>", _html_table(cycles)]
    write_text(paths.comparison_html(name), "\n".join(parts))
    return summary


def format_policy_table(summary: dict) -> str:
    """One block per policy: the per-cycle table."""
    return "\n".join(f"[{policy}]\n{format_table(v['cycles'])}" for policy, v in summary["policies"].items())


def main() -> None:
    """`python -m pipeline.report`: print the per-cycle table of reports/summary.json."""
    import sys

    path = Paths().summary
    if not path.is_file():
        sys.exit(f"{path} not found: run `make run` (or `dvc repro`) first")
    result = read_json(path)
    sys.stdout.write(f"dataset: {result['dataset']}  labels: {', '.join(result['labels'])}\n")
    sys.stdout.write(format_table(result["cycles"]) + f"\nstop: {result['stop_reason']}\n")
    sys.stdout.write("\n".join(sanity_lines(result.get("sanity"))) + "\n")


if __name__ == "__main__":
    main()
