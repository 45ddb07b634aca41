"""Pictures of a trained flow (matplotlib, imported lazily; ``pip install 'otflow[plot]'``).

2-D flows: the learned density as a heat map, samples, and trajectories from
data to latent. Higher dimensions: samples against data on the first two
coordinates and per-coordinate marginal histograms.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["plot_flow"]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install 'otflow[plot]'") from None
    return plt


def plot_flow(flow, path, *, data=None, n_samples: int = 5000, grid: int = 150, seed: int = 0,
              title: str | None = None) -> Path:
    """Write a PNG summarizing ``flow``: for 2-D flows the density heat map, samples beside
    the data, and trajectories from data (t = 0) to the latent (t = T); otherwise samples
    against data on the first two coordinates and marginal histograms.

    :param flow: the :class:`~otflow.Flow`.
    :param path: the PNG file to write (its folder is created).
    :param data: numpy rows drawn beside the samples for comparison; they set the plotting range.
    :param n_samples: samples drawn from the flow.
    :param grid: points per axis of the density heat map (2-D).
    :param seed: the seed of the samples.
    :param title: the figure's title.
    :returns: the path written.
    :raises ImportError: without matplotlib (``pip install 'otflow[plot]'``).
    """
    plt = _pyplot()
    samples = np.asarray(flow.sample(n_samples, seed=seed))
    ref = np.asarray(data, dtype=np.float64) if data is not None else samples
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if flow.event_shape == (2,):
        lo = np.quantile(ref, 0.001, axis=0)
        hi = np.quantile(ref, 0.999, axis=0)
        pad = 0.15 * (hi - lo)
        lo, hi = lo - pad, hi + pad
        gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], grid), np.linspace(lo[1], hi[1], grid))
        pts = np.stack([gx.ravel(), gy.ravel()], axis=1)
        logp = np.asarray(flow.log_prob(pts, on_failure="nan"), dtype=np.float64).reshape(grid, grid)
        fig, axes = plt.subplots(1, 3, figsize=(15, 5))
        im = axes[0].imshow(np.exp(logp), origin="lower", extent=(lo[0], hi[0], lo[1], hi[1]), cmap="magma",
                            aspect="auto")
        fig.colorbar(im, ax=axes[0], fraction=0.046)
        axes[0].set_title("learned density p(x)")
        if data is not None:
            axes[1].scatter(ref[:n_samples, 0], ref[:n_samples, 1], s=1, alpha=0.3, color="tab:gray", label="data")
        axes[1].scatter(samples[:, 0], samples[:, 1], s=1, alpha=0.4, color="tab:blue", label="samples")
        axes[1].set_xlim(lo[0], hi[0])
        axes[1].set_ylim(lo[1], hi[1])
        axes[1].legend(markerscale=8, loc="upper right")
        axes[1].set_title("samples" + (" vs data" if data is not None else ""))
        starts = ref[np.random.default_rng(seed).choice(len(ref), size=min(60, len(ref)), replace=False)]
        times = np.linspace(0.0, sum(flow.T), 25)
        traj = np.asarray(flow.trajectory(starts, times))
        for k in range(traj.shape[1]):
            axes[2].plot(traj[:, k, 0], traj[:, k, 1], color="tab:green", lw=0.8, alpha=0.7)
        axes[2].scatter(traj[0, :, 0], traj[0, :, 1], s=6, color="black", label="data (t = 0)", zorder=3)
        axes[2].scatter(traj[-1, :, 0], traj[-1, :, 1], s=6, color="tab:red", label="latent (t = T)", zorder=3)
        axes[2].legend(loc="upper right")
        axes[2].set_title("trajectories (standardized coordinates)")
        for ax in axes:
            ax.set_aspect("auto")
    else:
        d = min(flow.dim, 6)
        flat = samples.reshape(len(samples), -1)
        ref_flat = ref.reshape(len(ref), -1)
        fig, axes = plt.subplots(1, d + 1, figsize=(3.2 * (d + 1), 3.2))
        if data is not None:
            axes[0].scatter(ref_flat[:2000, 0], ref_flat[:2000, 1], s=1, alpha=0.3, color="tab:gray", label="data")
        axes[0].scatter(flat[:2000, 0], flat[:2000, 1], s=1, alpha=0.4, color="tab:blue", label="samples")
        axes[0].set_title("coordinates 0 and 1")
        axes[0].legend(markerscale=8)
        for i in range(d):
            ax = axes[i + 1]
            if data is not None:
                ax.hist(ref_flat[:, i], bins=60, density=True, alpha=0.5, color="tab:gray", label="data")
            ax.hist(flat[:, i], bins=60, density=True, alpha=0.5, color="tab:blue", label="samples")
            ax.set_title(f"marginal {i}")
    fig.suptitle(title or repr(flow))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
