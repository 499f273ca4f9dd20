"""``python -m bvgls_lab.pretrained.setup``: set up everything that can be obtained here.

The two ImageNet backbones (MobileNetV2, EfficientNet-Lite0) and the four tasks. Each asset
prints one line: ready, present, or skipped with the reason (a client such as npm or apt-get
missing, a failed download, a checksum mismatch). Exits 0 unless ``--strict`` and something
was skipped.
"""

from __future__ import annotations

import argparse
import logging
import sys

from bvgls.cli import configure_logging

from .assets import AssetUnavailable, ChecksumError

logger = logging.getLogger(__name__)


def setup_weights() -> dict[str, str]:
    """Both backbones' weights; ``{name: path or 'skipped: reason'}``."""
    from . import weights

    done = {}
    for name, step in (
        ("mobilenet_v2", weights.setup_mobilenet_v2),
        ("efficientnet_lite0", weights.setup_efficientnet_lite0),
    ):
        try:
            done[name] = str(step())
        except (AssetUnavailable, ChecksumError, ImportError, RuntimeError, ValueError) as e:
            done[name] = f"skipped: {e}"
            logger.info(f"{name} ImageNet weights: skipped: {str(e).splitlines()[0]}")
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bvgls_lab.pretrained.setup", description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=["weights", "tasks"], help="set up only the weights or only the tasks")
    parser.add_argument("--tasks", help="comma-separated task names (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the few-shot draws (default 0)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when anything was skipped")
    args = parser.parse_args(argv)
    configure_logging("bvgls_lab")
    results: dict[str, str] = {}
    if args.only != "tasks":
        results.update(setup_weights())
    if args.only != "weights":
        from .image_tasks import build_all, image_task_names

        names = [t.strip() for t in args.tasks.split(",")] if args.tasks else image_task_names()
        unknown = [t for t in names if t not in image_task_names()]
        if unknown:
            print(
                f"error: unknown task(s) {', '.join(unknown)}; known: {', '.join(image_task_names())}", file=sys.stderr
            )
            return 2
        results.update(build_all(names, seed=args.seed))
    skipped = [k for k, v in results.items() if v.startswith("skipped")]
    print(
        f"pretrained set-up: {len(results) - len(skipped)} ready, {len(skipped)} skipped"
        + (f" ({', '.join(skipped)})" if skipped else "")
    )
    return 1 if (skipped and args.strict) else 0


if __name__ == "__main__":
    sys.exit(main())
