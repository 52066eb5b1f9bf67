"""What a FedRE client keeps between rounds when every message runs in a fresh process.

Flower starts a new ClientApp process for each message, so a client's model, the
position of its random stream and its algorithm state (repro.fedre.algorithms.Client
.state: FedProto's global prototypes, FedRE's weights, ...) go to one safetensors file
per client between messages. safetensors only (no pickle): tensors and JSON metadata.

Layout of the file (keys):
- "model/<name>": the model's state_dict, buffers included (BatchNorm statistics);
- "generator": the client's torch.Generator state (uint8), so the data order and
  FedRE's weights continue the stream the simulation draws from;
- "state/<key>" (a tensor) or "state/<key>/<name>" (a dict of tensors, e.g. FedProto's
  uploaded prototypes); the metadata's "state_layout" says which, so an empty dict
  survives too.
The metadata also records the last finished round, which the next message checks.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from repro.core.errors import ReproInputError
from repro.core.io import load_tensors, save_tensors
from repro.fedre.algorithms import Client

STATE_KIND = "fedre_flower_client_state"
MODEL, GENERATOR, STATE = "model/", "generator", "state/"


def _copy(tensor: torch.Tensor) -> torch.Tensor:
    # A fresh contiguous copy: safetensors refuses tensors that share storage.
    return tensor.detach().clone().contiguous()


def client_state_tensors(client: Client) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The client's model, generator and algorithm state as flat tensors, and the layout
    of its algorithm state (key -> "tensor" or "dict")."""
    tensors = {MODEL + name: _copy(value) for name, value in client.model.state_dict().items()}
    tensors[GENERATOR] = client.gen.get_state()
    layout = {}
    for key, value in client.state.items():
        if "/" in key:
            raise ValueError(f"client state key {key!r}: '/' is the file's separator")
        if isinstance(value, torch.Tensor):
            tensors[STATE + key] = _copy(value)
            layout[key] = "tensor"
        elif isinstance(value, Mapping) and all(
            isinstance(v, torch.Tensor) for v in value.values()
        ):
            for name, tensor in value.items():
                tensors[f"{STATE}{key}/{name}"] = _copy(tensor)
            layout[key] = "dict"
        else:
            raise TypeError(
                f"client state {key!r}: {type(value).__name__} is neither a tensor nor a "
                "dict of tensors (only those travel through safetensors)"
            )
    return tensors, layout


def save_client_state(path: str | os.PathLike, client: Client, *, round: int, **meta) -> None:
    """Write `client` after `round` (0: freshly built) to `path`, atomically."""
    tensors, layout = client_state_tensors(client)
    save_tensors(path, tensors, STATE_KIND, {"round": round, "state_layout": layout, **meta})


def load_client_state(path: str | os.PathLike, client: Client, *, round: int) -> None:
    """Restore `client` (built fresh, same architecture) from `path`, which must hold the
    state after `round`; raises ReproInputError naming the file otherwise."""
    tensors, meta = load_tensors(path, STATE_KIND, required=(GENERATOR,))
    if meta.get("round") != round:
        raise ReproInputError(
            f"{path}: client state after round {meta.get('round')}, expected round {round} "
            "(a stale state directory, or a message delivered twice)"
        )
    model_state = {k[len(MODEL) :]: v for k, v in tensors.items() if k.startswith(MODEL)}
    client.model.load_state_dict(model_state, strict=True)
    client.gen.set_state(tensors[GENERATOR])
    client.state = {}
    for key, kind in dict(meta["state_layout"]).items():
        if kind == "tensor":
            client.state[key] = tensors[STATE + key]
        else:
            prefix = f"{STATE}{key}/"
            client.state[key] = {
                k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)
            }
