from pipeline.config import FlowParams
from pipeline.cycle_control import decide


def cyc(k, auroc, pg):
    return {"cycle": k, "auroc_macro": auroc, "pointing_game": pg}


def test_continues_while_localisation_improves():
    d = decide([cyc(0, 0.9, 0.1), cyc(1, 0.9, 0.3), cyc(2, 0.9, 0.5)], FlowParams(min_gain=0.01, patience=1))
    assert not d.stop and d.serve_cycle == 2


def test_stops_after_patience_without_gain():
    d = decide([cyc(0, 0.9, 0.1), cyc(1, 0.9, 0.3), cyc(2, 0.9, 0.305)], FlowParams(min_gain=0.01, patience=1))
    assert d.stop and "localisation" in d.reason and d.serve_cycle == 2


def test_stops_on_auroc_drop_and_serves_previous():
    d = decide([cyc(0, 0.9, 0.1), cyc(1, 0.88, 0.3), cyc(2, 0.80, 0.6)], FlowParams(auroc_tolerance=0.05))
    assert d.stop and "AUROC" in d.reason and d.serve_cycle == 1


def test_falls_back_to_energy_share_without_boxes():
    h = [{"cycle": 0, "auroc_macro": 0.9, "pointing_game": None, "cam_in_anatomy": 0.2},
         {"cycle": 1, "auroc_macro": 0.9, "pointing_game": None, "cam_in_anatomy": 0.2}]
    assert decide(h, FlowParams(patience=1)).stop


def test_serves_the_best_localising_cycle_within_tolerance():
    h = [cyc(0, 0.9, 0.3), cyc(1, 0.9, 0.6), cyc(2, 0.9, 0.5), cyc(3, 0.9, 0.55)]
    d = decide(h, FlowParams(min_gain=0.01, patience=3))
    assert not d.stop and d.serve_cycle == 1
    d = decide([cyc(0, 0.9, 0.3), cyc(1, 0.9, 0.3)], FlowParams(patience=3))
    assert d.serve_cycle == 1  # a tie goes to the later cycle
