"""The federated algorithms FedRE compares: what a client trains, what it uploads, what
the server does with the uploads, what it broadcasts and how a client predicts.

Every algorithm is the same five functions over one round (one implementation, used by
the in-process simulation, repro.fedre.simulate, and by the Flower apps alike):

    local_train(client)              the client's epoch(s) on its own train split
    upload(client) -> tensors        what it sends (a dict of tensors, serialised)
    server_step(uploads) -> tensors  the server's update; what it broadcasts (or None)
    receive(client, broadcast)       the client takes the broadcast in
    predict(client, x) -> labels     how the client's model classifies

As HtFLlib implements them (../shared/PAPERS.md, FedRE section):

- local: cross-entropy, nothing sent.
- fedproto: CE + lambda * MSE(rep, global prototype of y); uploads the mean
  representation of each class it has (collected during the training pass); the server
  averages each class over the clients that have it (unweighted) and broadcasts them;
  a client predicts the nearest global prototype.
- fedgh: CE; uploads its class prototypes (eval mode, train split); the server trains
  a head on the (prototype, class) pairs (CE, `server_epochs` epochs) and broadcasts it;
  clients overwrite their head.
- lg_fedavg: CE; uploads its head; the server averages the heads weighted by the
  clients' train samples and broadcasts the average.
- fedtgp: the client as fedproto (its own lambda); the server trains a prototype
  generator (class embedding -> MLP) with CE on negative distances plus an adaptive
  margin min(max class gap, margin_threshold) and broadcasts its prototypes.
- fedre: CE; class prototypes (eval mode, train split); weights w ~ U(0, 1) per class
  present, normalised, redrawn every round; uploads ONE entangled representation
  sum_c w_c proto_c and its soft label (w_c, c); the server trains the global head with
  sum_i sum_c w_c CE(head(r_i), c) (summed, as the official code) for `head_epochs`, and
  BROADCASTS it (the official server does not: fixed here); clients use it.
- fedallrep: CE; uploads every train representation with its label (the privacy
  reference: what FedRE avoids sending); the server trains the head on them as fedre's
  server does (same epochs) and broadcasts it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from repro.core.errors import ReproInputError
from repro.fedre.data import ClientData
from repro.fedre.model import ClientModel, PrototypeGenerator, head_state, load_head

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Hyper:
    """The algorithms' hyperparameters (config fedre.local, fedre.server, per algorithm)."""

    lr: float = 0.06  # clients' SGD
    epochs: int = 1  # local epochs per round
    batch_size: int = 32
    server_lr: float = 0.01
    server_batch_size: int = 32
    server_epochs: int = 100  # FedGH's head, FedTGP's generator, per round
    head_epochs: int = 1  # FedRE's and FedAllRep's head, per round
    fedproto_lambda: float = 1.0
    fedtgp_lambda: float = 10.0
    tgp_hidden: int = 128
    margin_threshold: float = 100.0
    resample_weights: bool = True  # FedRE: redraw w every round (the ablation: fixed)
    entangle: str = "random"  # FedRE's weights: random (U(0,1)), uniform, onehot

    @classmethod
    def from_config(cls, fr: Mapping) -> Hyper:
        local, server = fr.get("local", {}), fr.get("server", {})
        fedre = fr.get("fedre", {})
        return cls(
            lr=float(local.get("lr", cls.lr)),
            epochs=int(local.get("epochs", cls.epochs)),
            batch_size=int(local.get("batch_size", cls.batch_size)),
            server_lr=float(server.get("lr", cls.server_lr)),
            server_batch_size=int(server.get("batch_size", cls.server_batch_size)),
            server_epochs=int(server.get("epochs", cls.server_epochs)),
            head_epochs=int(server.get("head_epochs", cls.head_epochs)),
            fedproto_lambda=float(fr.get("fedproto", {}).get("lambda", cls.fedproto_lambda)),
            fedtgp_lambda=float(fr.get("fedtgp", {}).get("lambda", cls.fedtgp_lambda)),
            tgp_hidden=int(fr.get("fedtgp", {}).get("hidden", cls.tgp_hidden)),
            margin_threshold=float(
                fr.get("fedtgp", {}).get("margin_threshold", cls.margin_threshold)
            ),
            resample_weights=bool(fedre.get("resample_weights", cls.resample_weights)),
            entangle=str(fedre.get("entangle", cls.entangle)),
        )


@dataclass
class Client:
    """One client: its index, model, data and the random stream of its data order."""

    index: int
    model: ClientModel
    data: ClientData
    gen: torch.Generator
    state: dict = field(default_factory=dict)  # what it keeps between rounds

    @property
    def train_samples(self) -> int:
        return len(self.data.train_y)


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, gen: torch.Generator):
    """Shuffled mini-batches (the last one may be smaller), order drawn from `gen`."""
    order = torch.randperm(len(y), generator=gen)
    for start in range(0, len(y), batch_size):
        idx = order[start : start + batch_size]
        yield x[idx], y[idx]


@torch.no_grad()
def class_prototypes(model: ClientModel, x: torch.Tensor, y: torch.Tensor) -> Tensors:
    """Mean representation of each class in (x, y), eval mode: {"protos" [k, D],
    "classes" [k]} with classes ascending."""
    was_training = model.training
    model.eval()
    reps = model.features(x)
    model.train(was_training)
    return per_class_mean(reps, y)


def per_class_mean(reps: torch.Tensor, y: torch.Tensor) -> Tensors:
    classes = y.unique(sorted=True)
    protos = torch.stack([reps[y == c].mean(0) for c in classes])
    return {"protos": protos, "classes": classes.long()}


def entangle(protos: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """FedRE's entangled representation: sum_c w_c proto_c, as [1, D]."""
    return (weights.unsqueeze(1) * protos).sum(0, keepdim=True)


def entangle_weights(k: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    """Weights over the k classes a client has, summing to 1: random (U(0,1) normalised,
    FedRE), simplex (Dirichlet(1): normalised Exp(1) draws), uniform (1/k) or onehot
    (one class drawn uniformly)."""
    if kind == "random":
        w = torch.rand(k, generator=gen)
        return w / w.sum()
    if kind == "simplex":  # Dirichlet(1, ..., 1): uniform over the simplex
        w = -torch.log(torch.rand(k, generator=gen).clamp_min(1e-12))
        return w / w.sum()
    if kind == "uniform":
        return torch.full((k,), 1.0 / k)
    if kind == "onehot":
        w = torch.zeros(k)
        w[int(torch.randint(k, (1,), generator=gen))] = 1.0
        return w
    raise ReproInputError(
        f"fedre.fedre.entangle: unknown {kind!r} (allowed: random, simplex, uniform, onehot)"
    )


def soft_label_loss(logits: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """sum_i sum_c w_ic CE(logits_i, c) = -sum_i sum_c w_ic log softmax(logits_i)_c
    (summed over the batch, as the official server)."""
    return -(soft * F.log_softmax(logits, dim=1)).sum()


def train_head(
    head: nn.Linear,
    reps: torch.Tensor,
    targets: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    gen: torch.Generator,
    soft: bool,
) -> None:
    """SGD on the head over (rep, target) pairs: soft targets [n, C] with the summed
    soft-label loss (FedRE), or class indices with the mean cross-entropy (FedGH)."""
    opt = torch.optim.SGD(head.parameters(), lr=lr)
    for _ in range(epochs):
        for r, t in batches(reps, targets, batch_size, gen):
            logits = head(r)
            loss = soft_label_loss(logits, t) if soft else F.cross_entropy(logits, t)
            opt.zero_grad()
            loss.backward()
            opt.step()


class Algorithm:
    """Local training only: the base every algorithm refines."""

    name = "local"
    head_broadcast = False  # whether the broadcast is a head every client takes

    def __init__(self, hp: Hyper, num_classes: int, rep_dim: int, seed: int):
        self.hp = hp
        self.num_classes = num_classes
        self.rep_dim = rep_dim
        self.gen = torch.Generator().manual_seed(seed)  # the server's random stream

    # ---- client side
    def local_train(self, client: Client) -> None:
        model, data = client.model, client.data
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=self.hp.lr)
        for _ in range(self.hp.epochs):
            for x, y in batches(data.train_x, data.train_y, self.hp.batch_size, client.gen):
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()

    def upload(self, client: Client) -> Tensors:
        return {}

    def receive(self, client: Client, broadcast: Tensors | None) -> None:
        if broadcast is not None and self.head_broadcast:
            load_head(client.model, broadcast)

    @torch.no_grad()
    def predict(self, client: Client, x: torch.Tensor) -> torch.Tensor:
        client.model.eval()
        return client.model(x).argmax(1)

    # ---- server side
    def server_step(self, uploads: Sequence[Tensors]) -> Tensors | None:
        return None


class FedProto(Algorithm):
    name = "fedproto"

    def lam(self) -> float:
        return self.hp.fedproto_lambda

    def local_train(self, client: Client) -> None:
        model, data = client.model, client.data
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=self.hp.lr)
        protos = client.state.get("global_protos")  # [C, D], NaN rows for absent classes
        reps_seen, labels_seen = [], []
        for _ in range(self.hp.epochs):
            for x, y in batches(data.train_x, data.train_y, self.hp.batch_size, client.gen):
                rep = model.features(x)
                loss = F.cross_entropy(model.head(rep), y)
                if protos is not None:
                    target = protos[y]
                    known = ~torch.isnan(target[:, 0])
                    # Classes the server has no prototype of pull nowhere (target = rep).
                    target = torch.where(known.unsqueeze(1), target, rep.detach())
                    loss = loss + self.lam() * F.mse_loss(rep, target)
                opt.zero_grad()
                loss.backward()
                opt.step()
                reps_seen.append(rep.detach())
                labels_seen.append(y)
        # The prototypes of the training pass (HtFLlib's FedProto collects them there).
        client.state["protos"] = per_class_mean(torch.cat(reps_seen), torch.cat(labels_seen))

    def upload(self, client: Client) -> Tensors:
        return dict(client.state["protos"])

    def server_step(self, uploads: Sequence[Tensors]) -> Tensors:
        sums = torch.zeros(self.num_classes, self.rep_dim)
        counts = torch.zeros(self.num_classes)
        for up in uploads:
            sums.index_add_(0, up["classes"], up["protos"])
            counts.index_add_(0, up["classes"], torch.ones(len(up["classes"])))
        classes = torch.nonzero(counts > 0).flatten()
        return {"protos": sums[classes] / counts[classes].unsqueeze(1), "classes": classes}

    def receive(self, client: Client, broadcast: Tensors | None) -> None:
        if broadcast is None:
            return
        protos = torch.full((self.num_classes, self.rep_dim), float("nan"))
        protos[broadcast["classes"]] = broadcast["protos"]
        client.state["global_protos"] = protos

    @torch.no_grad()
    def predict(self, client: Client, x: torch.Tensor) -> torch.Tensor:
        """The nearest global prototype (squared distance); classes without one never win."""
        protos = client.state.get("global_protos")
        client.model.eval()
        rep = client.model.features(x)
        if protos is None:
            return client.model.head(rep).argmax(1)
        dist = torch.cdist(rep, torch.nan_to_num(protos, nan=0.0)) ** 2
        dist[:, torch.isnan(protos[:, 0])] = float("inf")
        return dist.argmin(1)


class FedTGP(FedProto):
    name = "fedtgp"

    def __init__(self, hp: Hyper, num_classes: int, rep_dim: int, seed: int):
        super().__init__(hp, num_classes, rep_dim, seed)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.generator = PrototypeGenerator(num_classes, rep_dim, hp.tgp_hidden)

    def lam(self) -> float:
        return self.hp.fedtgp_lambda

    def server_step(self, uploads: Sequence[Tensors]) -> Tensors:
        protos = torch.cat([up["protos"] for up in uploads])
        labels = torch.cat([up["classes"] for up in uploads])
        margin = min(class_gap(protos, labels), self.hp.margin_threshold)
        all_classes = torch.arange(self.num_classes)
        opt = torch.optim.SGD(self.generator.parameters(), lr=self.hp.server_lr)
        self.generator.train()
        for _ in range(self.hp.server_epochs):
            for p, y in batches(protos, labels, self.hp.server_batch_size, self.gen):
                centres = self.generator(all_classes)
                dist = torch.cdist(p, centres)
                dist = dist + margin * F.one_hot(y, self.num_classes)
                loss = F.cross_entropy(-dist, y)
                opt.zero_grad()
                loss.backward()
                opt.step()
        classes = labels.unique(sorted=True)
        with torch.no_grad():
            return {"protos": self.generator(classes), "classes": classes}


def class_gap(protos: torch.Tensor, labels: torch.Tensor) -> float:
    """FedTGP's adaptive margin before its threshold: for each class the distance from
    its average prototype to the nearest other class's, then the largest of those."""
    avg = per_class_mean(protos, labels)["protos"]
    if len(avg) < 2:
        return 0.0
    dist = torch.cdist(avg, avg)
    dist.fill_diagonal_(float("inf"))
    return float(dist.min(1).values.max())


class HeadServer(Algorithm):
    """Algorithms whose server keeps a global head and broadcasts it (initialised as
    the first client's head, as HtFLlib)."""

    head_broadcast = True

    def __init__(self, hp: Hyper, num_classes: int, rep_dim: int, seed: int):
        super().__init__(hp, num_classes, rep_dim, seed)
        self.head = nn.Linear(rep_dim, num_classes)

    def init_head(self, first_model: ClientModel) -> None:
        """The global head starts as the first client's initial head (HtFLlib's)."""
        self.head.load_state_dict(head_state(first_model))

    def broadcast_head(self) -> Tensors:
        return {k: v.detach().clone() for k, v in self.head.state_dict().items()}

    def fit_head(self, reps: torch.Tensor, targets: torch.Tensor, *, epochs: int, soft: bool):
        """The server's SGD on its head (lr and batch of fedre.server), then the broadcast."""
        train_head(
            self.head,
            reps,
            targets,
            epochs=epochs,
            lr=self.hp.server_lr,
            batch_size=self.hp.server_batch_size,
            gen=self.gen,
            soft=soft,
        )
        return self.broadcast_head()


class FedGH(HeadServer):
    name = "fedgh"

    def upload(self, client: Client) -> Tensors:
        return class_prototypes(client.model, client.data.train_x, client.data.train_y)

    def server_step(self, uploads: Sequence[Tensors]) -> Tensors:
        reps = torch.cat([up["protos"] for up in uploads])
        labels = torch.cat([up["classes"] for up in uploads])
        return self.fit_head(reps, labels, epochs=self.hp.server_epochs, soft=False)


class LGFedAvg(HeadServer):
    name = "lg_fedavg"

    def upload(self, client: Client) -> Tensors:
        state = head_state(client.model)
        return {**state, "samples": torch.tensor([client.train_samples])}

    def server_step(self, uploads: Sequence[Tensors]) -> Tensors:
        weights = torch.cat([up["samples"] for up in uploads]).double()
        weights = weights / weights.sum()
        averaged = {
            key: sum(w * up[key].double() for w, up in zip(weights, uploads, strict=True))
            for key in ("weight", "bias")
        }
        self.head.load_state_dict({k: v.float() for k, v in averaged.items()})
        return self.broadcast_head()


class FedRE(HeadServer):
    name = "fedre"

    def upload(self, client: Client) -> Tensors:
        protos = class_prototypes(client.model, client.data.train_x, client.data.train_y)
        k = len(protos["classes"])
        if self.hp.resample_weights or "weights" not in client.state:
            client.state["weights"] = entangle_weights(k, self.hp.entangle, client.gen)
        weights = client.state["weights"]
        if len(weights) != k:  # fixed weights, but the classes changed: draw again
            weights = client.state["weights"] = entangle_weights(k, self.hp.entangle, client.gen)
        return {
            "rep": entangle(protos["protos"], weights),
            "weights": weights,
            "classes": protos["classes"],
        }

    def server_step(self, uploads: Sequence[Tensors]) -> Tensors:
        reps = torch.cat([up["rep"] for up in uploads])
        soft = torch.zeros(len(uploads), self.num_classes)
        for i, up in enumerate(uploads):
            soft[i, up["classes"]] = up["weights"]
        return self.fit_head(reps, soft, epochs=self.hp.head_epochs, soft=True)


class FedAllRep(HeadServer):
    name = "fedallrep"

    @torch.no_grad()
    def upload(self, client: Client) -> Tensors:
        client.model.eval()
        reps = client.model.features(client.data.train_x)
        return {"reps": reps, "labels": client.data.train_y.clone()}

    def server_step(self, uploads: Sequence[Tensors]) -> Tensors:
        reps = torch.cat([up["reps"] for up in uploads])
        labels = torch.cat([up["labels"] for up in uploads])
        soft = F.one_hot(labels, self.num_classes).float()
        # The same server schedule and loss as FedRE's, on every representation.
        return self.fit_head(reps, soft, epochs=self.hp.head_epochs, soft=True)


ALGORITHM_CLASSES: dict[str, type[Algorithm]] = {
    cls.name: cls for cls in (Algorithm, FedProto, FedGH, LGFedAvg, FedTGP, FedRE, FedAllRep)
}


def make_algorithm(name: str, hp: Hyper, num_classes: int, rep_dim: int, seed: int) -> Algorithm:
    if name not in ALGORITHM_CLASSES:
        raise ReproInputError(
            f"fedre.algorithms: unknown algorithm {name!r} (allowed: {list(ALGORITHM_CLASSES)})"
        )
    return ALGORITHM_CLASSES[name](hp, num_classes, rep_dim, seed)
