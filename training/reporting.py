"""Training metrics: one JSON line per optimizer step (and TensorBoard scalars when asked), and the end-of-run
plots: loss curves (main, MTP, sequence-balance) and a heatmap of expert load per MoE layer over steps."""

from __future__ import annotations

import json
import os


class MetricsWriter:
    """Appends to `<output_dir>/metrics.jsonl`. On resume it first drops the lines after the checkpoint's step, so
    the file reads as one uninterrupted run."""

    def __init__(self, output_dir: str, resume_step: int | None, tensorboard: bool):
        self.path = os.path.join(output_dir, "metrics.jsonl")
        kept = []
        if resume_step is not None and os.path.exists(self.path):
            kept = [line for line in read_metrics(self.path) if line["step"] <= resume_step]
        with open(self.path, "w") as f:
            f.writelines(json.dumps(line) + "\n" for line in kept)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(output_dir, "tensorboard"), purge_step=resume_step)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, int | float) and key != "step":
                    self.tb.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_run(metrics_path: str, output_dir: str) -> list[str]:
    """Write loss_curves.png and expert_load.png from the metrics file; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    records = read_metrics(metrics_path)
    if not records:
        return []
    steps = [r["step"] for r in records]
    curves = [("lm_loss", "main (next-token CE)"), ("mtp_ce", "MTP CE (unweighted)"), ("aux_loss", "seq. balance (x alpha)")]
    curves = [(key, label) for key, label in curves if records[0].get(key) is not None]
    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.5), squeeze=False)
    for ax, (key, label) in zip(axes[0], curves, strict=True):
        ax.plot(steps, [r[key] for r in records])
        ax.set_title(label)
        ax.set_xlabel("step")
    fig.tight_layout()
    paths = [os.path.join(output_dir, "loss_curves.png")]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    # expert_load [steps, L, E] -> share of the layer's mean load, so 1.0 = perfectly balanced.
    load_SLE = np.array([r["expert_load"] for r in records], dtype=np.float64)
    rel_SLE = load_SLE / np.maximum(load_SLE.mean(-1, keepdims=True), 1e-12)
    L = load_SLE.shape[1]
    fig, axes = plt.subplots(L, 1, figsize=(8, 2.2 * L), squeeze=False)
    for layer, ax in enumerate(axes[:, 0]):
        image = ax.imshow(rel_SLE[:, layer].T, aspect="auto", cmap="viridis", origin="lower",
                          extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, load_SLE.shape[2] - 0.5))  # fmt: skip
        ax.set_ylabel(f"MoE layer {layer}\nexpert")
        fig.colorbar(image, ax=ax, label="load / mean")
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    paths.append(os.path.join(output_dir, "expert_load.png"))
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths
