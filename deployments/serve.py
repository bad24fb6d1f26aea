"""Serve the conan-pipeline flow from this process on a cron schedule (one machine, no work pool).

    python deployments/serve.py --cron "0 2 * * *" --config configs/demo.yaml [--set a.b=c ...]

The process polls the Prefect API (PREFECT_API_URL) for scheduled and manually triggered runs and executes
them in subprocesses; stop it with Ctrl-C (the served deployment is left paused).
"""

from __future__ import annotations

import argparse

from conan_core.paths import offline_env

DEFAULT_CRON = "0 2 * * *"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="conan-serve", help="deployment name")
    parser.add_argument("--cron", default=DEFAULT_CRON, help="cron schedule (UTC)")
    parser.add_argument("--config", default="configs/demo.yaml", help="pipeline YAML config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="override a.b=c")
    parser.add_argument("--out-dir", default=None, help="stage outputs (default <work dir>/runs/<config>)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    offline_env()
    from flows.pipeline import conan_pipeline

    conan_pipeline.serve(name=args.name, cron=args.cron,
                         parameters={"config": args.config, "overrides": args.overrides, "out_dir": args.out_dir})


if __name__ == "__main__":
    main()
