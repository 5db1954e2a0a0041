"""The default run through the Ray pipeline, with the backprop baseline of the same net beside it.

    python -m benchmarks.default_run          # writes benchmarks/results/default_run.md

Runs ``launch/train.py``'s default configuration (MNIST, Signal Propagation, 3 x 1000 fully
connected, one Ray actor per layer), the same net trained end to end with backprop for the same
epochs, and both on Fashion-MNIST; reports test accuracy after every epoch.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.common import machine, run, today

RESULTS = Path(__file__).parent / "results"
RUNS = {
    "MNIST, sigprop (default run, Ray, 3 stages)": [],
    "MNIST, backprop (same net, Ray, 1 stage)": ["--rule", "bp"],
    "Fashion-MNIST, sigprop (Ray, 3 stages)": ["--preset", "fashion-fc"],
    "Fashion-MNIST, backprop (same net, Ray, 1 stage)": ["--preset", "fashion-fc", "--rule", "bp"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(RESULTS / "default_run.md"))
    args = parser.parse_args()
    rows = {}
    for name, argv in RUNS.items():
        result = run(argv)
        rows[name] = result
        print(name, [round(e.accuracy, 4) for e in result.evaluations], round(result.wall_s, 1))
    epochs = max(len(r.evaluations) for r in rows.values())
    lines = [
        f"# Default run and backprop baseline ({today()}, {machine()})",
        "",
        "Command: `python -m benchmarks.default_run`. Test accuracy after each epoch: nearest-target "
        "prediction for sigprop, the output layer for backprop.",
        "",
        "| run | " + " | ".join(f"ep {e + 1}" for e in range(epochs)) + " | samples/s | wall s |",
        "|---|" + "---:|" * (epochs + 2),
    ]
    for name, result in rows.items():
        cells = [f"{100 * e.accuracy:.2f}%" for e in result.evaluations]
        cells += [""] * (epochs - len(cells))  # a run of fewer epochs leaves the later columns empty
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {result.train_samples_per_s:,.0f} | {result.wall_s:.0f} |"
        )
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print(path.read_text())


if __name__ == "__main__":
    main()
