"""Clustering of memory banks into prototypes: spherical k-means and Sinkhorn-balanced assignment."""

from cdretrieval.clustering.kmeans import (
    ClusterResult,
    assign_to_centroids,
    reseed_empty_clusters,
    spherical_kmeans,
)
from cdretrieval.clustering.sinkhorn import balanced_kmeans, sinkhorn

__all__ = [
    "ClusterResult",
    "assign_to_centroids",
    "balanced_kmeans",
    "reseed_empty_clusters",
    "sinkhorn",
    "spherical_kmeans",
]
