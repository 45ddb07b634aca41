"""Pictures of a trained flow (matplotlib, imported lazily; ``pip install 'otflow[plot]'``).

2-D flows: the learned density as a heat map, samples, and trajectories from
data to latent. Higher dimensions: samples against data on the first two
coordinates and per-coordinate marginal histograms. Image models: a grid of samples
beside a grid of data (:func:`plot_image_samples`).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

__all__ = ["plot_flow", "plot_image_samples", "image_grid"]


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


def image_grid(images: np.ndarray, *, columns: int | None = None, n_levels: int = 256) -> np.ndarray:
    """Tile images into one picture, one pixel of padding between them.

    :param images: pixel levels ``(N, C, H, W)`` (C = 1 or 3), integers ``0 … n_levels−1``.
    :param columns: images per row (default: the ceiling of √N).
    :param n_levels: the number of levels (the brightest is ``n_levels − 1``).
    :returns: floats in [0, 1], ``(rows·(H+1)+1, columns·(W+1)+1)`` for one channel, with a
        trailing RGB axis for three.
    :raises ValueError: for another shape or channel count.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1] not in (1, 3) or images.shape[0] == 0:
        raise ValueError(f"image_grid needs images (N, C, H, W) with N ≥ 1 and C 1 or 3, got shape {images.shape}")
    n, c, h, w = images.shape
    columns = columns or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / columns))
    grid = np.ones((c, rows * (h + 1) + 1, columns * (w + 1) + 1))
    scaled = images.astype(np.float64) / max(n_levels - 1, 1)
    for k in range(n):
        r, q = divmod(k, columns)
        grid[:, 1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = scaled[k]
    return grid[0] if c == 1 else np.transpose(grid, (1, 2, 0))


def plot_image_samples(flow, path, *, data=None, n: int = 64, seed: int = 0, n_levels: int = 256,
                       title: str | None = None) -> Path:
    """Write a PNG of an image model: a grid of ``n`` samples (quantized to ``n_levels``
    levels, :meth:`~otflow.cnf.MultiscaleFlow.sample_levels`) beside a grid of ``n`` data images.

    :param flow: the :class:`~otflow.cnf.MultiscaleFlow`.
    :param path: the PNG file to write (its folder is created).
    :param data: pixel levels ``(N, C, H, W)`` or ``(N, H, W)`` drawn beside the samples (the first ``n``), or None.
    :param n: images per grid.
    :param seed: the seed of the samples.
    :param n_levels: pixel levels (256; 17 for scikit-learn's digits).
    :param title: the figure's title.
    :returns: the path written.
    :raises ImportError: without matplotlib (``pip install 'otflow[plot]'``).
    """
    plt = _pyplot()
    samples = np.asarray(flow.sample_levels(n, seed=seed, n_bins=n_levels))
    panels = [("samples", samples)]
    if data is not None:
        data = np.asarray(data)
        panels.insert(0, ("data", data[:n, None] if data.ndim == 3 else data[:n]))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 5.4), squeeze=False)
    for ax, (name, images) in zip(axes[0], panels):
        ax.imshow(image_grid(images, n_levels=n_levels), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    fig.suptitle(title or f"{type(flow).__name__} {tuple(flow.image_shape)}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
