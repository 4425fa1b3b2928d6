"""DVC stage `audit`: plant the shortcut-audit marker (pipeline/audit.py) when `audit.enabled`.

Always a stage, so the DAG is the same either way: with the audit off it writes only
data/audit/audit.json (`enabled: false`, the same bytes every time, so nothing downstream re-runs)
and every later stage reads the prepared films and the U-Net's masks.
"""
import pandas as pd

from pipeline.audit import write_audit
from pipeline.data.store import ArrayStore
from pipeline.io import write_json
from pipeline.stages.common import stage_main


def run(params, paths, args) -> None:
    if not params.audit.enabled:
        write_json(paths.audit_summary, {"enabled": False})
        return
    write_audit(params.audit, pd.read_parquet(paths.prepared_manifest), ArrayStore(paths.prepared_images),
                ArrayStore(paths.predicted_masks), paths, params.data.shard_size)


if __name__ == "__main__":
    stage_main("audit", run)
