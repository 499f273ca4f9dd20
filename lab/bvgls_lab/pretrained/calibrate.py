"""``python -m bvgls_lab.pretrained.calibrate``: is a task worth finetuning an ImageNet backbone on?

A linear classifier on frozen features (scikit-learn logistic regression, its ``C`` chosen on the
task's val split) on the backbone's pooled features, with the task's own few-shot training draw, once with the ImageNet
weights and once with a random init of the same network. A task is kept when the pretrained
features clearly beat random ones and are far from chance:

    keep  <=>  err_random - err_pretrained >= 0.15  and  chance - err_pretrained >= 0.25

(chance = 1 - 1/classes). Stylised images can defeat ImageNet features (texture bias); a task
where every strategy sits near chance cannot tell strategies apart.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

C_GRID = (0.01, 0.1, 1.0, 10.0)
MIN_GAIN_OVER_RANDOM = 0.15
MIN_GAIN_OVER_CHANCE = 0.25


@dataclass
class ProbeResult:
    task: str
    backbone: str
    size: int
    classes: int
    train: int
    test: int
    chance_error: float
    pretrained_error: float
    random_error: float
    pretrained_c: float
    random_c: float

    @property
    def keep(self) -> bool:
        return (
            self.random_error - self.pretrained_error >= MIN_GAIN_OVER_RANDOM
            and self.chance_error - self.pretrained_error >= MIN_GAIN_OVER_CHANCE
        )


def feature_extractor(backbone: str, weights: str | None, seed: int = 0) -> nn.Module:
    """The backbone with its classifier removed: images -> pooled features (eval mode)."""
    from bvgls.runner.models import build_model

    torch.manual_seed(seed)
    model = build_model(backbone, 1000, weights=weights)
    if hasattr(model, "reset_classifier"):  # timm: pooled pre-logits
        model.reset_classifier(0)
    elif hasattr(model, "classifier"):
        model.classifier = nn.Identity()
    elif hasattr(model, "fc"):
        model.fc = nn.Identity()
    else:
        raise ValueError(f"cannot remove the classifier of {backbone}")
    return model.eval()


def split_features(model: nn.Module, folder: str, size: int, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of an ImageFolder, resized to ``size`` (whole image), normalised for the model."""
    from torchvision import transforms as T
    from torchvision.datasets import ImageFolder

    inp = model.bvgls_input
    tf = T.Compose(
        [
            T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC, antialias=True),
            T.ToTensor(),
            T.Normalize(inp.mean, inp.std),
        ]
    )
    data = ImageFolder(folder, transform=tf)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    feats, labels = [], []
    with torch.no_grad():
        for x, y in loader:
            feats.append(model(x).flatten(1).numpy())
            labels.append(y.numpy())
    return np.concatenate(feats), np.concatenate(labels)


def probe_error(train, val, test) -> tuple[float, float]:
    """Test error of a standardised logistic regression whose C is chosen on val; (error, C)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def fit(c):
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000)).fit(*train)

    best_c = max(C_GRID, key=lambda c: (fit(c).score(*val), -c))
    return 1.0 - fit(best_c).score(*test), best_c


def calibrate_task(task: str, backbone: str = "mobilenet_v2", size: int = 128, root: str | None = None) -> ProbeResult:
    from .image_tasks import task_path

    path = task_path(task, root)
    errors = {}
    for label, weights in (("pretrained", "DEFAULT"), ("random", None)):
        model = feature_extractor(backbone, weights)
        train, val, test = (split_features(model, str(path / s), size) for s in ("train", "val", "test"))
        errors[label] = probe_error(train, val, test)
    classes = int(train[1].max()) + 1
    return ProbeResult(
        task,
        backbone,
        size,
        classes,
        len(train[1]),
        len(test[1]),
        1.0 - 1.0 / classes,
        errors["pretrained"][0],
        errors["random"][0],
        errors["pretrained"][1],
        errors["random"][1],
    )


def format_table(results: list[ProbeResult]) -> str:
    lines = [
        "| task | backbone | px | classes | train | test | chance err | ImageNet err | random-init err | keep |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.task} | {r.backbone} | {r.size} | {r.classes} | {r.train} | {r.test} | "
            f"{r.chance_error:.1%} | {r.pretrained_error:.1%} | {r.random_error:.1%} | "
            f"{'yes' if r.keep else 'no'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from .image_tasks import image_task_names

    parser = argparse.ArgumentParser(
        prog="python -m bvgls_lab.pretrained.calibrate", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--tasks", default=",".join(image_task_names()), help="comma-separated tasks (default: all)")
    parser.add_argument("--backbone", default="mobilenet_v2", help="a registered model (default mobilenet_v2)")
    parser.add_argument("--size", type=int, default=128, help="input resolution in px (default 128)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = []
    for task in [t.strip() for t in args.tasks.split(",") if t.strip()]:
        try:
            results.append(calibrate_task(task, args.backbone, args.size))
        except (ValueError, KeyError) as e:
            print(f"{task}: skipped: {str(e).splitlines()[0]}", file=sys.stderr)
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{**asdict(r), "keep": r.keep} for r in results], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
