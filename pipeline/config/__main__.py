"""`python -m pipeline.config [params.yaml]`: validate params in a second, before a long run."""
from __future__ import annotations

import sys

from pipeline.config.params import ConfigError, load_params


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else "params.yaml"
    try:
        params = load_params(path)
    except ConfigError as err:
        sys.exit(f"error: {err}")
    sys.stdout.write(f"{path}: ok (source {params.data.source}, arch {params.train.arch}, "
                     f"{len(params.cycles)} refinement cycles)\n")


if __name__ == "__main__":
    main()
