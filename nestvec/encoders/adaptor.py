"""Unsupervised Matryoshka adaptor: a small learned map on top of a frozen model's embeddings that
makes every prefix keep the full vector's similarity structure, trained on the corpus alone.

After the Matryoshka-Adaptor (Yoon et al., 2024): f(e) = e + W2 relu(W1 e), trained so that for
each prefix size m the cosine similarities of f(e)[:m] match those of the full e, over random pairs
(pairwise loss) and over each vector's nearest neighbours (top-k loss), with a small reconstruction
term keeping f(e) close to e. Its baseline is a PCA rotation, which also orders dimensions by how
much variance they carry (see nestvec.encoders.dims). Saved as JSON + .npy, never pickled.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from nestvec.errors import invalid
from nestvec.fsutil import load_npy, save_npy, write_json

CONFIG_FILE = "adaptor.json"


@dataclass(frozen=True)
class AdaptorConfig:
    dims: tuple[int, ...] = (256, 128, 64, 32)
    hidden: int = 512
    steps: int = 1500
    batch_size: int = 512
    learning_rate: float = 1e-3
    top_k: int = 10
    reconstruction_weight: float = 0.1
    seed: int = 0


@dataclass
class MatryoshkaAdaptor:
    w1: np.ndarray  # [hidden, dim]
    b1: np.ndarray
    w2: np.ndarray  # [dim, hidden]
    b2: np.ndarray
    config: AdaptorConfig

    @property
    def dim(self) -> int:
        return int(self.w1.shape[1])

    def apply(self, vectors: np.ndarray, dim: int | None = None) -> np.ndarray:
        """The adapted vectors, cut to `dim` and unit length."""
        x = np.asarray(vectors, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise invalid("vectors", f"must be [n, {self.dim}], got {list(x.shape)}")
        out = x + np.maximum(x @ self.w1.T + self.b1, 0) @ self.w2.T + self.b2
        out = out[:, :dim] if dim else out
        return (out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)).astype(np.float32)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("w1", "b1", "w2", "b2"):
            save_npy(folder / f"{name}.npy", getattr(self, name))
        write_json(folder / CONFIG_FILE, {**asdict(self.config), "dims": list(self.config.dims)})

    @classmethod
    def load(cls, folder: Path) -> MatryoshkaAdaptor:
        raw = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        config = AdaptorConfig(**{**raw, "dims": tuple(raw["dims"])})
        w1, b1, w2, b2 = (load_npy(folder / f"{name}.npy") for name in ("w1", "b1", "w2", "b2"))
        return cls(w1, b1, w2, b2, config)


def fit_adaptor(corpus: np.ndarray, config: AdaptorConfig | None = None, *, progress: bool = True) -> MatryoshkaAdaptor:
    """Trains the adaptor on `corpus` ([n, d] unit vectors of the frozen model) alone."""
    import torch
    from tqdm import tqdm

    config = config or AdaptorConfig()
    x_all = torch.from_numpy(np.ascontiguousarray(corpus, dtype=np.float32))
    n, dim = x_all.shape
    if n < 2 * config.top_k + 2:
        raise invalid("corpus", f"needs more than {2 * config.top_k + 1} vectors, got {n}")
    if not config.dims or max(config.dims) > dim or min(config.dims) < 1:
        raise invalid("dims", f"must lie in 1..{dim}, got {list(config.dims)}")
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    # every vector's top-k neighbours under the full embedding: what the prefixes must keep (faiss for exact kNN)
    import faiss

    index = faiss.IndexFlatIP(dim)
    index.add(x_all.numpy())
    _, neighbours = index.search(x_all.numpy(), config.top_k + 1)
    neighbours_t = torch.from_numpy(neighbours[:, 1:].astype(np.int64))
    layer1, layer2 = torch.nn.Linear(dim, config.hidden), torch.nn.Linear(config.hidden, dim)
    torch.nn.init.zeros_(layer2.weight)  # start at the identity map: f(e) = e
    torch.nn.init.zeros_(layer2.bias)
    params = [*layer1.parameters(), *layer2.parameters()]
    optimiser = torch.optim.Adam(params, lr=config.learning_rate)
    dims = sorted(set(config.dims), reverse=True)

    def adapt(x: torch.Tensor) -> torch.Tensor:
        return x + layer2(torch.relu(layer1(x)))

    def cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cosine_similarity(a, b, dim=-1)

    bar = tqdm(range(config.steps), desc="adaptor", unit="step", disable=not progress)
    for _ in bar:
        batch = torch.randint(0, n, (config.batch_size,), generator=generator)
        x = x_all[batch]
        near = x_all[neighbours_t[batch]]                        # [b, k, d]
        y, y_near = adapt(x), adapt(near)
        target_pair = x @ x.T                                    # full-vector similarities within the batch
        target_near = (near @ x.unsqueeze(-1)).squeeze(-1)       # [b, k]
        loss = config.reconstruction_weight * (y - x).pow(2).sum(-1).mean()
        for m in dims:
            ym = torch.nn.functional.normalize(y[:, :m], dim=-1)
            loss = loss + (ym @ ym.T - target_pair).abs().mean()
            loss = loss + (cos(y[:, None, :m], y_near[:, :, :m]) - target_near).abs().mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    with torch.no_grad():
        return MatryoshkaAdaptor(layer1.weight.numpy().copy(), layer1.bias.numpy().copy(),
                                 layer2.weight.numpy().copy(), layer2.bias.numpy().copy(), config)
