"""Where a foundation model comes from, and the one loader every paper uses.

    foundation:
      t2i:
        pretrained: null                          # tiny / smoke: built into models/foundation/t2i
      # pretrained: stabilityai/stable-diffusion-2-1   # paper: a hub id (fetched by hub_fetch)
      # pretrained: /shared/models/sd21                # or a local directory

The rule side (rules/foundation.smk wraps these): `model_input(config, name)` is
what a job needing the model waits for, `model_params(config, name)` what it
passes the stage in --params. The stage side: `load_foundation(cls, params,
component)` loads it, whatever its source; `save_foundation(model, name, out)`
is how a build rule writes it. Importing this module imports no torch (Snakemake
imports it at parse time); the model I/O is imported when a model is loaded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from repro.core.errors import ReproInputError
from repro.core.hub import MANIFEST, cache_options, is_hub_id, loader_options

FOUNDATION_DIR = "models/foundation"


def built_dir(name: str) -> str:
    """The directory a rule of rules/foundation.smk builds model `name` into."""
    return f"{FOUNDATION_DIR}/{name}"


def kind(name: str) -> str:
    """The kind tag (repro.core.modelio) of a foundation model built by this pipeline."""
    return f"foundation.{name}"


def entry(config: Mapping, name: str) -> Mapping:
    """config["foundation"][name], or an error naming the missing key."""
    models = config.get("foundation") or {}
    if name not in models:
        raise ReproInputError(
            f"foundation.{name}: no such foundation model in the config "
            f"(configured: {sorted(models) or 'none'})"
        )
    return models[name]


def is_built(config: Mapping, name: str) -> bool:
    """True when the pipeline builds model `name` (pretrained: null)."""
    return entry(config, name).get("pretrained") is None


def model_input(config: Mapping, name: str, manifest: str = MANIFEST) -> list[str]:
    """The input of a job that loads model `name`: the built directory (pretrained: null),
    the hub manifest (a hub id: hub_fetch has filled the cache), or the local directory."""
    pretrained = entry(config, name).get("pretrained")
    if pretrained is None:
        return [built_dir(name)]
    if is_hub_id(pretrained):
        return [manifest]
    return [str(pretrained)]


def model_params(config: Mapping, name: str) -> dict:
    """What a stage needs to load model `name` (JSON, for --params): its name,
    `pretrained` (the built directory, a hub id or a local directory), `subfolder`,
    and the hub cache options for a hub id (cache_dir; local_files_only when
    hub.offline, as for every hub checkpoint)."""
    model = entry(config, name)
    pretrained = model.get("pretrained")
    params = {"name": name, "subfolder": model.get("subfolder")}
    if pretrained is None:
        return {
            **params,
            "pretrained": built_dir(name),
            "subfolder": None,
            "local_files_only": True,
        }
    params["pretrained"] = str(pretrained)
    if not is_hub_id(pretrained):
        return {**params, "local_files_only": True}
    return {**params, "local_files_only": False, **cache_options(config)}


def save_foundation(model, name: str, out_dir: str | os.PathLike | None = None) -> None:
    """Write a built model (anything with save_pretrained: a model or a pipeline) into
    `out_dir` (default built_dir(name)), atomically, tagged foundation.<name>."""
    from repro.core.modelio import save_model

    save_model(model, built_dir(name) if out_dir is None else out_dir, kind(name))


def load_foundation(cls, params: Mapping, component: str | None = None):
    """`cls` loaded from a foundation model: the stage side of model_params.

    `params` is model_params' dict; `component` a subfolder inside the model (a
    pipeline's "unet", "text_encoder", ...), joined to the entry's own subfolder.
    The same from_pretrained call serves the built directory, a local directory
    and a hub checkpoint in the cache. A directory built for another model is
    refused, and every error names foundation.<name>. Float32, eval mode.
    """
    from repro.core.modelio import check_kind, from_pretrained

    name = params.get("name") or "?"
    source = params.get("pretrained")
    if not source:
        raise ReproInputError(f"foundation.{name}: params hold no 'pretrained' source")
    subfolder = "/".join(p.strip("/") for p in (params.get("subfolder"), component) if p) or None
    where = f"foundation.{name}: {source}" + (f" (subfolder {subfolder})" if subfolder else "")
    if Path(source).is_dir():
        check_kind(source, kind(name), where)
    # transformers (5.x) joins `subfolder` into paths: None fails there, so it is left out.
    options = {**loader_options(params), **({"subfolder": subfolder} if subfolder else {})}
    return from_pretrained(cls, str(source), where, **options)


# ----------------------------------------------------------------------------- pipelines
# Helpers of the foundation models saved as a pipeline directory (model_index.json and a
# subfolder per component: the text-to-image and text-to-video models).

MODEL_INDEX = "model_index.json"


def where(params: Mapping, component: str | None = None, default_name: str = "?") -> str:
    """`foundation.<name>: <source> (subfolder <sub>)`: how an error names the model."""
    subfolder = "/".join(p.strip("/") for p in (params.get("subfolder"), component) if p)
    return f"foundation.{params.get('name') or default_name}: {params.get('pretrained')}" + (
        f" (subfolder {subfolder})" if subfolder else ""
    )


def library_entry(obj) -> list:
    """A model_index.json entry: [library, class name], [None, None] for no component."""
    if obj is None:
        return [None, None]
    return [type(obj).__module__.split(".")[0], type(obj).__name__]


def root_file(params: Mapping, filename: str) -> Path | None:
    """A file at the model's root (source + subfolder): from the local directory or the
    hub cache (never the network when local_files_only); None if it is not there."""
    source = str(params.get("pretrained") or "")
    subfolder = (params.get("subfolder") or "").strip("/")
    if not is_hub_id(source):
        path = Path(source, subfolder, filename)
        return path if path.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return Path(
            hf_hub_download(source, filename, subfolder=subfolder or None, **loader_options(params))
        )
    except (EntryNotFoundError, LocalEntryNotFoundError):
        return None
    except OSError as err:
        raise ReproInputError(f"{where(params)}: cannot read {filename} ({err})") from err


def has_vae(params: Mapping, what: str) -> bool:
    """Whether the pipeline has a VAE: its model_index.json lists one. `what` names the
    kind of pipeline in the error for a directory that is not one."""
    index_file = root_file(params, MODEL_INDEX)
    if index_file is None:
        raise ReproInputError(f"{where(params)}: no {MODEL_INDEX} (not a {what} model directory)")
    try:
        index = json.loads(index_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ReproInputError(f"{where(params)}: {MODEL_INDEX} is not valid JSON ({err})") from err
    entry = index.get("vae")
    return isinstance(entry, list) and entry[-1] is not None
