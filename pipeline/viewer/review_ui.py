"""The review tab: a reviewer goes through the run's val/test films and marks, per label, whether the
call is right and where the heatmap looks, optionally with boxes; marks go to the feedback store.

Only users with the reviewer role see the tab (the page load shows it to them), and every handler
checks the role again on the server, since an event can be sent without the page. Films are read
from the run's own store by `image_id` (review.py), never uploaded; pictures are inline data URIs,
so nothing is written to Gradio's cache.

A box is entered as x, y, w, h in the film's own pixels (what the store holds and the model saw),
or set by clicking two opposite corners on the film (a click sends its pixel to the server, which
fills the four fields); "Add box" checks it and adds it to the label's pending mark, "Save" stores
the mark. Keys (outside a text field): n next film, p previous, u next unreviewed, s or Ctrl+S save,
a / d agree / disagree, 1 / 2 / 3 heatmap on the finding / a shortcut / elsewhere, b add box.
"""
from __future__ import annotations

import html
import logging

import gradio as gr

from pipeline.feedback import BOX_KINDS, CALLS, HEATMAP_VERDICTS, SHORTCUT_WHATS, FeedbackError, validate_box
from pipeline.viewer.auth import REVIEWER, Users
from pipeline.viewer.inference import Analysis, NoModel
from pipeline.viewer.render import boxes_overlay, data_uri
from pipeline.viewer.review import NoFilms, ReviewFilms
from pipeline.viewer.ui import heatmaps_html, label_rows

log = logging.getLogger(__name__)
esc = html.escape

HEATMAP_CHOICES = [("on the finding", "finding"), ("on a shortcut", "shortcut"), ("elsewhere", "elsewhere")]
assert [v for _, v in HEATMAP_CHOICES] == list(HEATMAP_VERDICTS)
CALL_CHOICES = [("agree with the call", "agree"), ("disagree", "disagree")]
assert [v for _, v in CALL_CHOICES] == list(CALLS)
REFUSED = "Review mode needs the reviewer role."

KEYS_JS = """
if (!window.cxrReviewKeys) {
  window.cxrReviewKeys = true;
  const keys = {n: '#review-next', p: '#review-prev', u: '#review-next-unreviewed', s: '#review-save',
                a: '#review-call input[value="agree"]', d: '#review-call input[value="disagree"]',
                '1': '#review-heatmap input[value="finding"]', '2': '#review-heatmap input[value="shortcut"]',
                '3': '#review-heatmap input[value="elsewhere"]', b: '#box-add'};
  document.addEventListener('keydown', (e) => {
    const tab = document.querySelector('#review-tab');
    if (!tab || tab.offsetParent === null) return;   // the review tab is not on screen
    const t = e.target;
    const typing = t && ((t.tagName === 'INPUT' && !['radio', 'checkbox', 'button'].includes(t.type))
                         || t.tagName === 'TEXTAREA' || t.isContentEditable);
    let sel = null;
    if ((e.ctrlKey || e.metaKey) && e.key.toLowerCase() === 's') sel = keys.s;
    else if (!typing && !e.ctrlKey && !e.metaKey && !e.altKey) sel = keys[e.key];
    const el = sel && document.querySelector(sel);
    if (el) { e.preventDefault(); el.click(); }
  });
}
"""
PICK_JS = """
element.addEventListener('click', (ev) => {
  const img = ev.target.closest('img[data-size]');
  if (!img) return;
  const r = img.getBoundingClientRect(), n = parseInt(img.dataset.size);
  const at = (v, lo, len) => Math.min(n - 1, Math.max(0, Math.floor((v - lo) / len * n)));
  trigger('select', {index: [at(ev.clientX, r.left, r.width), at(ev.clientY, r.top, r.height)], value: null});
});
"""
CSS = """
#review-probs table,#review-marks table{border-collapse:collapse;width:100%}
#review-probs td,#review-probs th,#review-marks td,#review-marks th{padding:3px 6px;border-bottom:1px solid #ddd;text-align:left}
#review-probs .bar{display:inline-block;height:10px;background:#3b82f6;vertical-align:middle}
#review-probs tr.pos td{font-weight:600}
#review-pick img{width:320px;cursor:crosshair;border-radius:4px}
"""


def _box_text(b: dict) -> str:
    what = f" ({b['what']})" if b.get("what") else ""
    return f"{b['kind']}{what} at x {b['x']}, y {b['y']}, {b['w']}×{b['h']} px"


def _mark_text(m: dict | None) -> str:
    if not m:
        return "—"
    n = len(m.get("boxes") or [])
    return f"{m['call']} · heatmap {m['heatmap']}" + (f" · {n} box{'es' if n != 1 else ''}" if n else "")


def marks_html(marks: dict[str, dict]) -> str:
    if not marks:
        return "<p>No marks of yours on this film yet.</p>"
    rows = "".join(f"<tr data-label='{esc(label)}'><td>{esc(label)}</td><td>{esc(m['call'])}</td>"
                   f"<td>{esc(m['heatmap'])}</td><td>{esc('; '.join(_box_text(b) for b in m['boxes'] or []) or '—')}</td>"
                   f"<td>{esc(str(m['time'])[:19])}</td></tr>" for label, m in sorted(marks.items()))
    return ("<h4>Your marks on this film</h4><table><tr><th>label</th><th>call</th><th>heatmap</th><th>boxes</th>"
            f"<th>saved (UTC)</th></tr>{rows}</table>")


def boxes_html(boxes: list[dict]) -> str:
    if not boxes:
        return "<p>No boxes for this label.</p>"
    return "<ol>" + "".join(f"<li>{esc(_box_text(b))}</li>" for b in boxes) + "</ol>"


def pick_html(a: Analysis, image_id: str, boxes: list[dict], corner=None) -> str:
    side = int(a.image.shape[-1])
    return (f"<figure><img data-size='{side}' alt='film {esc(image_id)}: click two corners to set a box' "
            f"src='{data_uri(boxes_overlay(a.image, boxes, corner=corner))}'>"
            f"<figcaption>The film ({side}×{side} px). Click two opposite corners to fill in a box.</figcaption>"
            "</figure>")


def review_tab(films: ReviewFilms, users: Users):
    """The tab's components and events; call inside the Blocks. Returns (tab, load event's fn, outputs)."""
    models = films.models

    def reviewer(request: gr.Request | None) -> str:
        name = getattr(request, "username", None)
        if users.role(name) != REVIEWER:
            log.warning("review: refused an event from a user without the reviewer role")
            raise gr.Error(REFUSED)
        return name

    def film_view(user: str, image_id: str, label: str | None = None, status: str = "",
                  a: Analysis | None = None) -> tuple:
        a = a if a is not None else films.analyse(image_id)
        info = films.info(image_id)
        marks = {r["label"]: r for r in films.marks(user, image_id).to_dict("records")}
        order = [a.labels[k] for k in a.order()]
        if label not in order:
            label = next((lab for lab in order if lab not in marks), order[0])
        reviewed, total = films.progress(user)
        mark = marks.get(label)
        boxes = list(mark["boxes"]) if mark else []
        state = {"image_id": image_id, "analysis": a, "label": label, "boxes": boxes, "corner": None}
        head, rows = label_rows(a, lambda lab: f"<td class='mark'>{esc(_mark_text(marks.get(lab)))}</td>")
        probs = f"<table>{head}<th>your mark</th></tr>{rows}</table>"
        film = (f"**Film `{esc(image_id)}`** ({info['split']} split), {info['position']} of {info['total']} — "
                f"cycle {a.latest.cycle} beside cycle {a.baseline.cycle if a.baseline else '—'}")
        return (state, f"**{reviewed} of {total} reviewed**", film, probs, gr.update(choices=order, value=label),
                heatmaps_html(a, label), pick_html(a, image_id, boxes), gr.update(value=mark["call"] if mark else None),
                gr.update(value=mark["heatmap"] if mark else None), boxes_html(boxes), marks_html(marks), status)

    def blank(status: str) -> tuple:
        return (None, "", "", "", gr.update(choices=[], value=None), "", "", gr.update(value=None),
                gr.update(value=None), "", "", status)

    def guarded(fn):
        """Run a film-showing handler; a missing model or run becomes a message, not an error."""
        try:
            return fn()
        except (NoModel, NoFilms) as err:
            return blank(f"**{esc(str(err))}**")

    def on_open(request: gr.Request):
        if users.role(getattr(request, "username", None)) != REVIEWER:
            return (gr.update(visible=False), *[gr.skip()] * 12)
        user = request.username

        def show():
            models.load()
            image_id = films.next_unreviewed(user)
            status = ""
            if image_id is None:
                image_id, status = films.ids()[0], "Every film is reviewed: thank you."
            return film_view(user, image_id, status=status)
        return (gr.update(visible=True), *guarded(show))

    def on_move(step: int, state: dict | None, request: gr.Request):
        user = reviewer(request)

        def show():
            models.load()
            ids = films.ids()
            here = state["image_id"] if state and state.get("image_id") in ids else None
            if step == 0:   # the next unreviewed
                image_id = films.next_unreviewed(user, here)
                if image_id is None:
                    return film_view(user, here or ids[0], status="Every film is reviewed: thank you.")
            else:
                k = ids.index(here) + step if here else 0
                image_id = ids[k % len(ids)]
            return film_view(user, image_id)
        return guarded(show)

    def on_label(label: str | None, state: dict | None, request: gr.Request):
        user = reviewer(request)
        if not state or label not in state["analysis"].labels:
            return state, "", "", gr.update(), gr.update(), "", ""
        a = state["analysis"]
        mark = next((r for r in films.marks(user, state["image_id"]).to_dict("records") if r["label"] == label), None)
        boxes = list(mark["boxes"]) if mark else []
        state = {**state, "label": label, "boxes": boxes, "corner": None}
        return (state, heatmaps_html(a, label), pick_html(a, state["image_id"], boxes),
                gr.update(value=mark["call"] if mark else None), gr.update(value=mark["heatmap"] if mark else None),
                boxes_html(boxes), "")

    def on_pick(state: dict | None, evt: gr.SelectData, request: gr.Request):
        reviewer(request)
        if not state:
            return state, gr.update(), gr.update(), gr.update(), gr.update(), gr.update(), ""
        side = int(state["analysis"].image.shape[-1])
        try:
            x, y = (int(v) for v in evt.index)
        except (TypeError, ValueError):
            return state, gr.update(), gr.update(), gr.update(), gr.update(), gr.update(), ""
        x, y = min(max(x, 0), side - 1), min(max(y, 0), side - 1)
        a, image_id = state["analysis"], state["image_id"]
        if state.get("corner") is None:
            state = {**state, "corner": (x, y)}
            return (state, x, y, gr.update(), gr.update(), pick_html(a, image_id, state["boxes"], (x, y)),
                    f"First corner at ({x}, {y}): click the opposite corner.")
        (x0, y0), state = state["corner"], {**state, "corner": None}
        bx, by, bw, bh = min(x0, x), min(y0, y), abs(x - x0) + 1, abs(y - y0) + 1
        return (state, bx, by, bw, bh, pick_html(a, image_id, state["boxes"]),
                f"Box at ({bx}, {by}), {bw}×{bh} px: choose its kind and press Add box.")

    def on_add(state: dict | None, x, y, w, h, kind: str | None, what: str | None, request: gr.Request):
        reviewer(request)
        if not state:
            return state, gr.update(), gr.update(), "Open a film first."
        raw = {"x": x, "y": y, "w": w, "h": h, "kind": kind, "what": what if kind == "shortcut" else None}
        try:
            box = validate_box(raw, int(state["analysis"].image.shape[-1]))
        except FeedbackError as err:
            return state, gr.update(), gr.update(), f"**Box not added:** {esc(str(err))}"
        boxes = [*state["boxes"], box]
        state = {**state, "boxes": boxes, "corner": None}
        return (state, boxes_html(boxes), pick_html(state["analysis"], state["image_id"], boxes),
                f"Box added to {esc(state['label'])}: press Save to store the mark.")

    def on_clear(state: dict | None, request: gr.Request):
        reviewer(request)
        if not state:
            return state, gr.update(), gr.update()
        state = {**state, "boxes": [], "corner": None}
        return state, boxes_html([]), pick_html(state["analysis"], state["image_id"], [])

    def on_save(state: dict | None, call: str | None, heatmap: str | None, request: gr.Request):
        user = reviewer(request)
        if not state:
            return blank("Open a film first.")
        label, image_id = state["label"], state["image_id"]
        mark = {"image_id": image_id, "label": label, "call": call, "heatmap": heatmap, "boxes": state["boxes"]}
        try:
            films.save(user, [mark])
        except FeedbackError as err:
            return (*[gr.skip()] * 11, f"**Not saved:** {esc(str(err))}")
        except (NoModel, NoFilms) as err:
            return (*[gr.skip()] * 11, f"**Not saved:** {esc(str(err))}")
        done = {r["label"] for r in films.marks(user, image_id).to_dict("records")}
        todo = [lab for lab in (state["analysis"].labels[k] for k in state["analysis"].order()) if lab not in done]
        status = f"Saved {esc(label)}: {esc(_mark_text(mark))}. " + (
            f"Next: {esc(todo[0])}." if todo else "Every label of this film is marked: press n for the next film.")
        return guarded(lambda: film_view(user, image_id, todo[0] if todo else label, status, state["analysis"]))

    with gr.Tab("Review", id="review", visible=False, elem_id="review-tab") as tab:
        state = gr.State(None)
        gr.HTML("", js_on_load=KEYS_JS, elem_id="review-keys", apply_default_css=False)
        with gr.Row():
            progress = gr.Markdown("", elem_id="review-progress")
            film = gr.Markdown("", elem_id="review-film")
        with gr.Row():
            prev_btn = gr.Button("◀ Previous (p)", elem_id="review-prev", size="sm")
            next_btn = gr.Button("Next (n) ▶", elem_id="review-next", size="sm")
            todo_btn = gr.Button("Next unreviewed (u) »", elem_id="review-next-unreviewed", size="sm")
        probs = gr.HTML("", elem_id="review-probs")
        label = gr.Radio(choices=[], label="Label to mark", elem_id="review-label", interactive=True)
        figs = gr.HTML("", elem_id="review-heatmaps")
        with gr.Row():
            with gr.Column(scale=1):
                pick = gr.HTML("", elem_id="review-pick", js_on_load=PICK_JS)
            with gr.Column(scale=1):
                call = gr.Radio(CALL_CHOICES, value=None, label="The call (a / d)", elem_id="review-call",
                                interactive=True)
                heat = gr.Radio(HEATMAP_CHOICES, value=None, label="The heatmap lies (1 / 2 / 3)",
                                elem_id="review-heatmap", interactive=True)
                with gr.Row():
                    bx = gr.Number(None, label="x", precision=0, elem_id="box-x", minimum=0)
                    by = gr.Number(None, label="y", precision=0, elem_id="box-y", minimum=0)
                    bw = gr.Number(None, label="w", precision=0, elem_id="box-w", minimum=1)
                    bh = gr.Number(None, label="h", precision=0, elem_id="box-h", minimum=1)
                with gr.Row():
                    kind = gr.Dropdown(list(BOX_KINDS), value="evidence", label="box around", elem_id="box-kind")
                    what = gr.Dropdown(list(SHORTCUT_WHATS), value="marker", label="shortcut kind", elem_id="box-what")
                with gr.Row():
                    add_btn = gr.Button("Add box (b)", elem_id="box-add", size="sm")
                    clear_btn = gr.Button("Clear boxes", elem_id="box-clear", size="sm")
                boxes = gr.HTML("", elem_id="review-boxes")
                save_btn = gr.Button("Save mark (s)", variant="primary", elem_id="review-save")
                status = gr.Markdown("", elem_id="review-status")
        marks = gr.HTML("", elem_id="review-marks")
        gr.Markdown("Keys: **n** next, **p** previous, **u** next unreviewed, **s** save, **a**/**d** agree/disagree, "
                    "**1**/**2**/**3** heatmap on the finding/a shortcut/elsewhere, **b** add box.")

    shown = [state, progress, film, probs, label, figs, pick, call, heat, boxes, marks, status]
    private = {"api_visibility": "private"}
    def mover(step: int):
        def move(s: dict | None, request: gr.Request):
            return on_move(step, s, request)
        return move

    for btn, step in ((prev_btn, -1), (next_btn, 1), (todo_btn, 0)):
        btn.click(mover(step), inputs=state, outputs=shown, concurrency_id="analyse", show_progress="minimal",
                  **private)
    label.input(on_label, inputs=[label, state], outputs=[state, figs, pick, call, heat, boxes, status], queue=False,
                **private)
    pick.select(on_pick, inputs=state, outputs=[state, bx, by, bw, bh, pick, status], queue=False, **private)
    add_btn.click(on_add, inputs=[state, bx, by, bw, bh, kind, what], outputs=[state, boxes, pick, status],
                  queue=False, **private)
    clear_btn.click(on_clear, inputs=state, outputs=[state, boxes, pick], queue=False, **private)
    save_btn.click(on_save, inputs=[state, call, heat], outputs=shown, concurrency_id="analyse",
                   show_progress="minimal", **private)
    return tab, on_open, shown
