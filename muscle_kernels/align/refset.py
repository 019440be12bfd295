"""Drawing the clean reference set for gradient alignment, as in the paper (96 samples by default).

- `select_random(num_samples, k)`: k distinct random indices.
- `select_kmeans(features, k)`: k-means with k clusters over per-sample features (e.g. hidden states), then the index
  of the sample nearest to each centroid -- k distinct samples that cover the feature space.
- `hidden_state_features(model, batches)`: per-sample features from a Hugging Face model's hidden states (mean-pooled
  over the attention mask, or the first token), for `select_kmeans`.

All return sorted int64 index tensors into the candidate pool (usually the clean samples one trusts), so the caller
builds the reference batches with its own dataset and collate function.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

__all__ = ["select_random", "select_kmeans", "hidden_state_features", "select_reference"]


def _check_k(k: int, num_samples: int) -> None:
    if not isinstance(k, int) or k <= 0:
        raise ValueError(f"k: expected a positive int, got {k!r}")
    if k > num_samples:
        raise ValueError(f"k: asked for {k} reference samples but the pool has only {num_samples}")


def select_random(num_samples: int, k: int = 96, *, seed: int = 0) -> torch.Tensor:
    """k distinct indices drawn uniformly from range(num_samples), sorted."""
    _check_k(k, num_samples)
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(num_samples, generator=gen)[:k].sort().values


def select_kmeans(features: torch.Tensor, k: int = 96, *, seed: int = 0, n_init: int = 4) -> torch.Tensor:
    """Cluster `features` [N, d] into k clusters (scikit-learn KMeans) and return, for every centroid, the index of the
    nearest sample (Euclidean); distinct indices, sorted. When two centroids share a nearest sample, the later one
    takes its nearest sample not yet chosen."""
    if not isinstance(features, torch.Tensor) or features.dim() != 2:
        raise ValueError(
            f"features: expected a [num_samples, dim] tensor, got "
            f"{tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__}"
        )
    if not torch.isfinite(features).all():
        raise ValueError("features: contains NaN or inf")
    _check_k(k, features.shape[0])
    try:
        from sklearn.cluster import KMeans
    except ImportError as exc:  # an optional dependency (extras "demo"/"test")
        raise ImportError("select_kmeans needs scikit-learn (pip install scikit-learn)") from exc
    x = features.detach().float().cpu()
    km = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(x.numpy())
    centroids = torch.from_numpy(km.cluster_centers_).float()
    order = torch.cdist(centroids, x).argsort(dim=1)  # [k, N]: samples by distance, per centroid
    chosen, taken = [], set()
    for row in order.tolist():
        idx = next(i for i in row if i not in taken)
        taken.add(idx)
        chosen.append(idx)
    return torch.tensor(sorted(chosen), dtype=torch.int64)


@torch.no_grad()
def hidden_state_features(
    model: torch.nn.Module,
    batches: Iterable[Mapping[str, Any]],
    *,
    layer: int = -1,
    pool: str = "mean",
    progress: bool = True,
) -> torch.Tensor:
    """Per-sample features [N, hidden] from `model(**batch, output_hidden_states=True).hidden_states[layer]`.

    batches: dicts of model inputs (input_ids, attention_mask, ...) already on the model's device; labels are dropped.
    pool: "mean" (masked mean over tokens, using attention_mask when present) or "first" (the first token, [CLS]).
    """
    if pool not in ("mean", "first"):
        raise ValueError(f"pool: expected 'mean' or 'first', got {pool!r}")
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    out = []
    try:
        for batch in tqdm(batches, desc="hidden states", disable=not progress, leave=False):
            inputs = {k: v for k, v in batch.items() if k not in ("labels", "label")}
            hidden = model(**inputs, output_hidden_states=True).hidden_states[layer].float()
            if pool == "first":
                out.append(hidden[:, 0].cpu())
                continue
            mask = inputs.get("attention_mask")
            mask = torch.ones(hidden.shape[:2], device=hidden.device) if mask is None else mask.to(hidden.dtype)
            out.append(((hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)).cpu())
    finally:
        model.train(was_training)
    if not out:
        raise ValueError("batches: is empty")
    return torch.cat(out)


def select_reference(
    num_samples: int, k: int = 96, *, method: str = "random", features: torch.Tensor | None = None, seed: int = 0
) -> torch.Tensor:
    """`select_random` or `select_kmeans` by name ("random" | "kmeans"; kmeans needs `features` [num_samples, d])."""
    if method == "random":
        return select_random(num_samples, k, seed=seed)
    if method == "kmeans":
        if features is None:
            raise ValueError("features: required for method='kmeans' (e.g. from hidden_state_features)")
        if features.shape[0] != num_samples:
            raise ValueError(f"features: has {features.shape[0]} rows but num_samples is {num_samples}")
        return select_kmeans(features, k, seed=seed)
    raise ValueError(f"method: expected 'random' or 'kmeans', got {method!r}")
