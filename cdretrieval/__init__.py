"""cdretrieval — unsupervised cross-domain image retrieval.

Learn a shared embedding of unlabeled images from several visual domains (CDS + PCS self-supervised
pretraining), index each domain with FAISS, and query "image from domain A → matches in domain B".
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
