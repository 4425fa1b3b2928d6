"""The Gradio Blocks UI: upload, per-label probabilities, heatmaps (served cycle vs cycle 0), anatomy,
shortcut warning, model card, phantom examples; and, for users with the reviewer role, the review
tab (review_ui.py), which the page shows only to them.

Every picture is an inline data URI inside HTML, so Gradio writes no output image to its cache;
the uploaded file itself (Gradio stores uploads in its private temp dir) is deleted as soon as it
has been read. An upload event reads only a regular file inside that folder, within the size limit
(`uploaded_file`): a path an event names is the client's word, and Gradio's own check of it
applies only to launched Blocks. Every refusal gets the same message, so it tells no one whether a
path exists. Label switches re-render from the session's state: all labels' heatmaps came from
the one pass made at upload.
"""
from __future__ import annotations

import html
import logging
from pathlib import Path

import gradio as gr

from pipeline.viewer.card import NOTICE, card_markdown
from pipeline.viewer.inference import Analysis, ImageError, NoModel, ServedModels, anatomy_of_label
from pipeline.viewer.shortcut_warning import SHORTCUT_LIFT, warns
from pipeline.viewer.examples import examples
from pipeline.viewer.render import anatomy_overlay, data_uri, overlay

log = logging.getLogger(__name__)
esc = html.escape

CSS = """
#probs table{border-collapse:collapse;width:100%}
#probs td,#probs th{padding:3px 6px;border-bottom:1px solid #ddd;text-align:left}
#probs .bar{display:inline-block;height:10px;background:#3b82f6;vertical-align:middle}
#probs tr.pos td{font-weight:600}
.cxr-figs{display:flex;gap:12px;flex-wrap:wrap}
.cxr-figs figure{margin:0;max-width:330px}
.cxr-figs img{width:100%;image-rendering:auto;border-radius:4px}
.cxr-warn{background:#fff3cd;color:#664d03;border:1px solid #ffe69c;padding:8px;border-radius:4px;margin:6px 0}
.cxr-ok{color:#0f5132}
.cxr-notice{background:#f8d7da;color:#58151c;padding:6px 10px;border-radius:4px}
"""


def _in_upload_dir(path: str) -> Path | None:
    """`path` when it names something inside Gradio's upload folder that is not a link, else None."""
    from gradio.utils import get_upload_folder

    try:
        p = Path(path)
        inside = p.is_absolute() and not p.is_symlink() and Path(get_upload_folder()).resolve() in p.resolve().parents
    except (OSError, ValueError, RuntimeError):
        return None
    return p if inside else None


def uploaded_file(path: str, max_bytes: int) -> Path | None:
    """`path` if it is a regular file (not a link) inside the upload folder, of at most `max_bytes`; else None."""
    import stat

    p = _in_upload_dir(path)
    try:
        st = p.lstat() if p is not None else None
    except OSError:
        return None
    return p if st is not None and stat.S_ISREG(st.st_mode) and 0 < st.st_size <= max_bytes else None


def _remove_upload(path: str | None) -> None:
    """Delete Gradio's stored copy of an upload (only ever inside Gradio's own temp dir)."""
    p = _in_upload_dir(path) if path else None
    if p is None:
        return
    p.unlink(missing_ok=True)
    try:
        p.parent.rmdir()
    except OSError:
        pass


def _pct(v) -> str:
    return "—" if v is None else f"{100 * v:.0f}%"


def _lift(v) -> str:
    return "" if v is None else f" (lift {v:.2f})"


def label_rows(a: Analysis, extra=None) -> str:
    """One table row per label, highest probability first; `extra(label)` adds cells at the end."""
    rows = []
    for k in a.order():
        label, p, t = a.labels[k], float(a.latest.probabilities[k]), a.thresholds[k]
        warn = " ⚠" if warns(a.latest.lifts[k]) else ""
        base = (f"<td>{a.baseline.probabilities[k]:.3f}</td>" if a.baseline is not None else "")
        rows.append(f"<tr class='{'pos' if p >= t else 'neg'}' data-label='{esc(label)}'><td>{esc(label)}</td>"
                    f"<td><span class='bar' style='width:{int(80 * p)}px'></span> {p:.3f}</td><td>{t:.3f}</td>"
                    f"<td>{'positive' if p >= t else 'negative'}</td>{base}"
                    f"<td>{_pct(a.latest.shares[k])}{_lift(a.latest.lifts[k])}{warn}</td>"
                    f"{extra(label) if extra else ''}</tr>")
    head = ("<tr><th>label</th><th>probability</th><th>threshold</th><th>call</th>"
            + (f"<th>cycle {a.baseline.cycle}</th>" if a.baseline is not None else "")
            + "<th>heatmap in anatomy</th>")
    return head, "".join(rows)


def probabilities_html(a: Analysis) -> str:
    head, rows = label_rows(a)
    src = a.source
    facts = f"{esc(src['format'].upper())}, {src['width']}×{src['height']} px" + (f", view {esc(src['view'])}" if src.get("view") else "")
    return (f"<p>Cycle {a.latest.cycle} on the uploaded image ({facts}); {a.timings_ms['total']:.0f} ms.</p>"
            f"<table>{head}</tr>{rows}</table>")


def heatmaps_html(a: Analysis, label: str | None) -> str:
    if label not in a.labels:
        label = a.labels[a.order()[0]]
    k = a.labels.index(label)
    anatomy = anatomy_of_label(label)
    share = a.latest.shares[k]
    figs = [(f"cycle {a.latest.cycle} (served)", overlay(a.image, a.latest.cams[k]),
             f"Cycle {a.latest.cycle}: p = {a.latest.probabilities[k]:.3f}; {_pct(share)} of the heatmap in the {anatomy}",
             "heatmap-latest")]
    if a.baseline is not None:
        figs.append((f"cycle {a.baseline.cycle} (baseline)", overlay(a.image, a.baseline.cams[k]),
                     f"Cycle {a.baseline.cycle}: p = {a.baseline.probabilities[k]:.3f}; "
                     f"{_pct(a.baseline.shares[k])} of the heatmap in the {anatomy}", "heatmap-baseline"))
    figs.append(("anatomy", anatomy_overlay(a.image, a.mask, highlight=anatomy),
                 "Predicted anatomy (U-Net): lungs green, heart magenta" if a.mask is not None
                 else "No anatomy model (U-Net) found", "anatomy"))
    body = "".join(f"<figure id='{fid}'><img alt='{esc(alt)} heatmap for {esc(label)}' src='{data_uri(img)}'>"
                   f"<figcaption>{esc(cap)}</figcaption></figure>" for alt, img, cap, fid in figs)
    lift, fraction = a.latest.lifts[k], a.fractions[k]
    if a.mask is None:
        verdict = "<p>No anatomy model (U-Net) was found, so there is no in-anatomy share.</p>"
    elif fraction is None:
        verdict = f"<p>The anatomy model found no {anatomy} on this film, so there is no in-anatomy share.</p>"
    elif share is None:
        verdict = f"<p>The heatmap for <i>{esc(label)}</i> is empty: the model found no positive evidence for it.</p>"
    elif warns(lift):
        verdict = (f"<div class='cxr-warn' id='shortcut-warning'><b>⚠ Possible shortcut.</b> Only {_pct(share)} of "
                   f"the heatmap's energy for <i>{esc(label)}</i> lies inside the {anatomy}, which covers "
                   f"{_pct(fraction)} of the image (lift {lift:.2f}, below {SHORTCUT_LIFT:g}: the {anatomy} gets less than "
                   f"{SHORTCUT_LIFT:g}× what an even spread over the image would give it). The model may be reading "
                   "something else (a marker, text, the film's edge): do not trust this score without looking.</div>")
    else:
        verdict = (f"<p class='cxr-ok' id='anatomy-ok'>{_pct(share)} of the heatmap's energy for "
                   f"<i>{esc(label)}</i> lies inside the {anatomy}, which covers {_pct(fraction)} of the image "
                   f"(lift {lift:.2f}).</p>")
    return (f"<h4 id='heatmap-title'>Heatmaps for {esc(label)}</h4>{verdict}<div class='cxr-figs'>{body}</div>"
            "<p><small>A heatmap shows where the model's evidence lies; it is not a lesion outline.</small></p>")


UNREADABLE = "**Cannot read the uploaded file.**"


def build_ui(models: ServedModels, card_fn, title: str = "CXR refine — viewer", *, max_bytes: int = 20 << 20,
             delete_cache: tuple[int, int] | None = None, users=None, films=None) -> gr.Blocks:
    """The page; with `users` and `films` (a review.ReviewFilms), the review tab for reviewers."""
    example_list = examples()
    example_titles = {e.title: e for e in example_list}

    def status_and_card():
        try:
            models.load()
        except NoModel as err:
            return f"**{esc(str(err))}**", "", gr.update(choices=[], value=None)
        return "", card_markdown(card_fn()), gr.update()

    def run(data: bytes, truth: dict | None = None):
        try:
            a = models.analyse(data)
        except NoModel as err:
            return None, "", gr.update(choices=[], value=None), "", f"**{esc(str(err))}**"
        except ImageError as err:
            return None, "", gr.update(choices=[], value=None), "", f"**Cannot analyse this file:** {esc(str(err))}"
        choices = [a.labels[k] for k in a.order()]
        msg = ""
        if truth:
            pos = [k for k, v in truth.items() if v]
            msg = f"Example with ground truth: **{esc(', '.join(pos) if pos else 'no finding')}**."
        return a, probabilities_html(a), gr.update(choices=choices, value=choices[0]), heatmaps_html(a, choices[0]), msg

    def on_upload(path: str | None):
        if not path:
            return None, "", gr.update(), "", "", gr.update()
        try:
            checked = uploaded_file(path, max_bytes)
            data = checked.read_bytes() if checked is not None else None
        except OSError:
            data = None
        finally:
            _remove_upload(path)
        if data is None:
            return None, "", gr.update(), "", UNREADABLE, None
        return (*run(data), None)  # the stored upload is gone: clear the component (no dangling link)

    def on_example(title: str | None):
        ex = example_titles.get(title or "")
        if ex is None:
            return None, "", gr.update(), "", ""
        return run(ex.path.read_bytes(), ex.truth)

    def on_label(label: str | None, a: Analysis | None):
        return heatmaps_html(a, label) if a is not None and label else ""

    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=delete_cache) as demo:
        gr.Markdown(f"## Chest X-ray viewer\n<p class='cxr-notice'>{esc(NOTICE)}</p>")
        state = gr.State(None)
        with gr.Tabs(elem_id="tabs"):
            with gr.Tab("Predict", id="predict", elem_id="predict-tab"):
                with gr.Row():
                    with gr.Column(scale=1):
                        upload = gr.File(label="Chest X-ray: PNG, JPEG or DICOM", type="filepath", file_count="single",
                                         elem_id="upload")
                        example = gr.Dropdown(choices=list(example_titles), value=None,
                                              label="…or try a phantom example", elem_id="examples", interactive=True)
                        message = gr.Markdown("", elem_id="message")
                        status = gr.Markdown("", elem_id="status")
                    with gr.Column(scale=2):
                        probs = gr.HTML("", elem_id="probs")
                label = gr.Radio(choices=[], label="Heatmap for label", elem_id="label-select", interactive=True)
                heatmaps = gr.HTML("", elem_id="heatmaps")
            review = None
            if users is not None and films is not None:
                from pipeline.viewer.review_ui import review_tab

                review = review_tab(films, users)
        with gr.Accordion("Model card", open=False, elem_id="model-card-box"):
            card = gr.Markdown("", elem_id="model-card")
        outputs = [state, probs, label, heatmaps, message]
        upload.upload(on_upload, inputs=upload, outputs=[*outputs, upload], concurrency_id="analyse", show_progress="minimal",
                      api_visibility="private")
        example.input(on_example, inputs=example, outputs=outputs, concurrency_id="analyse", show_progress="minimal",
                      api_visibility="private")
        label.change(on_label, inputs=[label, state], outputs=heatmaps, queue=False, api_visibility="private")
        demo.load(status_and_card, outputs=[status, card, label], queue=False, api_visibility="private")
        if review is not None:
            tab, on_open, shown = review
            demo.load(on_open, outputs=[tab, *shown], concurrency_id="analyse", api_visibility="private")
    return demo
