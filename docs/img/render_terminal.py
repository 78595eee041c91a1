"""Render captured terminal lines as a PNG (the README's picture of the progress bar).

    python examples/finetune_digits.py --steps 6000 2>&1 | tr '\\r' '\\n' | grep 'ttp=' | sed -n 100p > bar.txt
    python docs/img/render_terminal.py bar.txt docs/img/progress_bar.png
"""

import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(source: str, target: str) -> None:
    lines = open(source, encoding="utf-8").read().rstrip("\n").splitlines()
    width = max(len(line) for line in lines)
    fig = plt.figure(figsize=(0.075 * width + 0.4, 0.28 * len(lines) + 0.3), facecolor="#1e1e1e")
    for i, line in enumerate(lines):
        fig.text(0.01, 1 - (i + 0.8) / (len(lines) + 0.3), line, family="DejaVu Sans Mono", fontsize=9,
                 color="#d4d4d4")
    fig.savefig(target, dpi=150, facecolor=fig.get_facecolor())


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
