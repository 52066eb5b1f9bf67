"""A representation-inversion attack on what each algorithm uploads.

No attack code is public for the paper; this is the standard learning-based inversion
in its worst case for the clients: the server knows each client's final backbone
(white box) and holds auxiliary public images of the same kind (glyphs rendered with
another seed, never a client's data). For each client it trains a decoder
representation -> image on (backbone(aux), aux) pairs, then decodes every vector the
client uploaded in the last round:

- fedallrep: every train representation (the reference: all of them),
- fedproto: one prototype per class it holds (a class mean),
- fedre: its one entangled representation (a random mix of its prototypes).

Each reconstruction is scored against the NEAREST true train image of that client
(smallest MSE), pixels in [0, 1]: MSE and PSNR = 10 log10(1 / MSE). A higher PSNR means
the upload gives more of the client's images away. Per algorithm the table reports the
mean over clients of each client's mean.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from repro.fedre.algorithms import Client, Tensors

# Which tensor of an upload holds the vectors the attack decodes.
UPLOADED_VECTORS = {"fedallrep": "reps", "fedproto": "protos", "fedtgp": "protos",
                    "fedgh": "protos", "fedre": "rep"}  # fmt: skip


class Decoder(nn.Module):
    """representation -> image in [-1, 1]: a two-layer MLP."""

    def __init__(self, rep_dim: int, shape: Sequence[int], hidden: int = 256):
        super().__init__()
        self.shape = tuple(shape)
        pixels = int(torch.tensor(self.shape).prod())
        self.net = nn.Sequential(
            nn.Linear(rep_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, pixels), nn.Tanh(),
        )  # fmt: skip

    def forward(self, rep: torch.Tensor) -> torch.Tensor:
        return self.net(rep).view(-1, *self.shape)


def train_decoder(
    client: Client,
    aux: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    gen: torch.Generator,
) -> Decoder:
    """A decoder of `client`'s final backbone (eval mode), fitted on the auxiliary images."""
    client.model.eval()
    with torch.no_grad():
        reps = client.model.features(aux)
    decoder = Decoder(reps.shape[1], aux.shape[1:])
    opt = torch.optim.Adam(decoder.parameters(), lr=lr)
    for _ in range(epochs):
        order = torch.randperm(len(aux), generator=gen)
        for start in range(0, len(aux), batch_size):
            idx = order[start : start + batch_size]
            loss = F.mse_loss(decoder(reps[idx]), aux[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return decoder


def nearest_mse(recon: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per reconstruction, the MSE to its nearest image of `images`, pixels in [0, 1]
    (both given in [-1, 1]), and that image's index."""
    a = ((recon.flatten(1) + 1) / 2).double()
    b = ((images.flatten(1) + 1) / 2).double()
    d = torch.cdist(a, b) ** 2 / a.shape[1]
    best = d.min(1)
    return best.values.float(), best.indices


def psnr(mse: torch.Tensor) -> torch.Tensor:
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def attack(
    algorithm: str,
    clients: Sequence[Client],
    uploads: Sequence[tuple[int, Tensors]],
    aux: torch.Tensor,
    cfg: Mapping,
    *,
    seed: int,
    keys: Mapping,
    archs: Sequence[str],
    examples: dict | None = None,
) -> list[dict]:
    """One row per client that uploaded: its decoded uploads against its own images.
    `examples` (if given) receives the first client's reconstructions (at most 8) and
    their nearest true images, as "<algorithm>/recon" and "<algorithm>/nearest"."""
    key = UPLOADED_VECTORS[algorithm]
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for index, tensors in uploads:
        client = clients[index]
        decoder = train_decoder(
            client,
            aux,
            epochs=int(cfg.get("epochs", 30)),
            lr=float(cfg.get("lr", 1e-3)),
            batch_size=int(cfg.get("batch_size", 128)),
            gen=gen,
        )
        with torch.no_grad():
            recon = decoder(tensors[key].reshape(-1, tensors[key].shape[-1]))
        mse, nearest = nearest_mse(recon, client.data.train_x)
        if examples is not None and not rows:
            examples[f"{algorithm}/recon"] = recon[:8].clone()
            examples[f"{algorithm}/nearest"] = client.data.train_x[nearest[:8]].clone()
        rows.append(
            {
                **keys,
                "algorithm": algorithm,
                "client": index,
                "arch": archs[index],
                "vectors": len(recon),
                "mse": float(mse.mean()),
                "psnr": float(psnr(mse).mean()),
            }
        )
    return rows
