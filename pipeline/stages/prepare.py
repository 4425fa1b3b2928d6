"""DVC stage `prepare`: the source's images into the manifest, boxes, image/mask stores and grid."""
from pipeline.data.prepare import prepare
from pipeline.io import write_json
from pipeline.stages.common import stage_main


def run(params, paths, args) -> None:
    write_json(paths.prepare_summary, prepare(params, paths))


if __name__ == "__main__":
    stage_main("prepare", run)
