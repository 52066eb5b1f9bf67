"""Hub checkpoints for jobs that cannot reach the hub: fetched once, then read from a cache.

The compute nodes of a cluster often have no internet. So loading a hub
checkpoint at paper scale takes two steps:

1. The local rule `hub_fetch` (rules/hub.smk) runs on the host that runs
   Snakemake, before any job needs a checkpoint. It downloads every hub
   checkpoint the config names into `hub.cache_dir` (a huggingface_hub cache)
   with `huggingface_hub.snapshot_download`, and writes a manifest: config key,
   hub id, subfolder, the revision fetched, local path, files.
2. Each job that loads such a checkpoint takes the manifest as an input and
   passes `from_pretrained` the options of `loader_options`: `cache_dir`, and
   with `hub.offline` (the default) `local_files_only=True`, so that it reads
   the cache and never the network.

    python -m repro.core.hub fetch --params '{"cache_dir": "...", "sources": [...]}' --out manifest.json
    python -m repro.core.hub list config.yaml configs/paper.yaml   # what the config would fetch

Which config values are hub checkpoints is a function of the config
(`hub_sources`), over the keys of `hub_keys(config)`: every entry of the
`foundation` section (foundation.<name>.pretrained, its subfolder), then the
`hub_keys` each paper registers (repro.core.papers): a paper that loads another
checkpoint adds its key to its own spec. A value that names a local path (absolute,
starting with "." or "~", or an existing directory) is loaded from there and
not fetched. At tiny and smoke scale no key names a hub checkpoint, so nothing
is fetched. Only JSON configs and safetensors weights are fetched (and, for the
foundation entries, the tokenizer's merges.txt): no pickle.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from repro.core.errors import ReproInputError
from repro.core.papers import discover_papers

log = logging.getLogger(__name__)

# The manifest hub_fetch writes (rules/hub.smk); jobs that load from the cache take it as input.
MANIFEST = "models/hub/manifest.json"

# What from_pretrained reads of a diffusers / transformers checkpoint: its configs
# and safetensors weights (a repository's pickled .bin copies are never fetched).
DEFAULT_PATTERNS = ("*.json", "*.safetensors")
# A foundation model also ships its CLIP tokenizer as vocab.json + merges.txt (SD's
# tokenizer/, CLIP's root): the merges are text, so *.txt is fetched too (still no pickle).
FOUNDATION_PATTERNS = (*DEFAULT_PATTERNS, "*.txt")


@dataclass(frozen=True)
class HubSource:
    """One hub checkpoint the config names: `key` is the config key, for messages."""

    key: str
    repo_id: str
    subfolder: str | None = None
    revision: str | None = None
    patterns: tuple[str, ...] = DEFAULT_PATTERNS

    def allow_patterns(self) -> list[str]:
        """snapshot_download's allow_patterns: the patterns, inside the subfolder if any."""
        prefix = f"{self.subfolder.strip('/')}/" if self.subfolder else ""
        return [prefix + p for p in self.patterns]

    def as_dict(self) -> dict:
        return {**asdict(self), "patterns": list(self.patterns)}


def _lookup(config: Mapping, dotted: str):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def is_hub_id(value) -> bool:
    """True for a hub id ("org/name" or "name"); False for a local path or an empty value."""
    if not isinstance(value, str) or not value.strip():
        return False
    if value.startswith(("/", ".", "~")) or os.path.exists(value):
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def hub_keys(config: Mapping) -> list[tuple[str, str | None]]:
    """(config key naming a checkpoint, config key of its subfolder or None), in order:
    the foundation models (config section `foundation`), then each paper's hub_keys."""
    keys = [
        (f"foundation.{name}.pretrained", f"foundation.{name}.subfolder")
        for name in (config.get("foundation") or {})
    ]
    for paper in discover_papers():
        keys += paper.hub_keys
    return keys


def keys_on_hub(config: Mapping, keys: Sequence[tuple[str, str | None]] | None = None) -> set[str]:
    """The config keys whose value is a hub id: every one, also those whose checkpoint
    hub_sources lists once under another key (a job loading it still reads the cache)."""
    if keys is None:
        keys = hub_keys(config)
    return {key for key, _ in keys if is_hub_id(_lookup(config, key))}


def hub_sources(
    config: Mapping, keys: Sequence[tuple[str, str | None]] | None = None
) -> list[HubSource]:
    """The hub checkpoints `config` names, in `keys` order (default: hub_keys(config)),
    each (id, subfolder) once."""
    if keys is None:
        keys = hub_keys(config)
    sources, seen = [], set()
    for key, subfolder_key in keys:
        value = _lookup(config, key)
        if not is_hub_id(value):
            continue
        subfolder = _lookup(config, subfolder_key) if subfolder_key else None
        if (value, subfolder) in seen:
            continue
        seen.add((value, subfolder))
        patterns = FOUNDATION_PATTERNS if key.startswith("foundation.") else DEFAULT_PATTERNS
        sources.append(
            HubSource(key=key, repo_id=value, subfolder=subfolder or None, patterns=patterns)
        )
    return sources


def cache_options(config: Mapping) -> dict:
    """from_pretrained's options for a checkpoint that hub_fetch put in the cache, from
    the workflow config: `cache_dir` (hub.cache_dir), and `local_files_only` when
    hub.offline (the default), so that a job reads the cache and never the network."""
    hub = config.get("hub") or {}
    options = {"cache_dir": str(hub["cache_dir"])} if hub.get("cache_dir") else {}
    if hub.get("offline", True):
        options["local_files_only"] = True
    return options


def loader_options(params: Mapping) -> dict:
    """from_pretrained's cache options from a stage's params (cache_dir, local_files_only)."""
    options = {"local_files_only": bool(params.get("local_files_only", False))}
    if params.get("cache_dir"):
        options["cache_dir"] = str(params["cache_dir"])
    return options


def _source(entry: Mapping, index: int) -> HubSource:
    where = f"--params sources[{index}]"
    if not isinstance(entry, Mapping) or not entry.get("repo_id") or not entry.get("key"):
        raise ReproInputError(
            f"{where}: expected an object with 'key' and 'repo_id', got {entry!r}"
        )
    unknown = set(entry) - set(HubSource.__dataclass_fields__)
    if unknown:
        raise ReproInputError(f"{where}: unknown fields {sorted(unknown)}")
    patterns = tuple(entry.get("patterns") or DEFAULT_PATTERNS)
    return HubSource(**{**entry, "patterns": patterns})


def fetch(
    sources: Sequence[HubSource], cache_dir: str | os.PathLike, download: Callable | None = None
) -> dict:
    """Download every source into `cache_dir`; the manifest of what is there.

    `download` is huggingface_hub.snapshot_download unless given; it returns the
    local snapshot directory (.../snapshots/<commit>), whose name is the revision.
    Raises ReproInputError naming the config key when a source cannot be fetched
    or lacks a config.json or safetensors weights.
    """
    if download is None:
        import huggingface_hub

        download = huggingface_hub.snapshot_download
    cache_dir = Path(cache_dir).resolve()
    cache_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for source in sources:
        where = f"{source.key}: {source.repo_id}"
        log.info("fetching %s (%s) into %s", where, ", ".join(source.allow_patterns()), cache_dir)
        try:
            snapshot = Path(
                download(
                    repo_id=source.repo_id,
                    revision=source.revision,
                    cache_dir=str(cache_dir),
                    allow_patterns=source.allow_patterns(),
                )
            )
        except Exception as err:  # network, authentication, unknown id: name the key
            raise ReproInputError(
                f"{where}: cannot fetch it from the hub into {cache_dir} "
                f"({type(err).__name__}: {err}); a gated model needs HF_TOKEN"
            ) from err
        root = snapshot / source.subfolder if source.subfolder else snapshot
        files = sorted(p.relative_to(snapshot).as_posix() for p in root.rglob("*") if p.is_file())
        if "config.json" not in {Path(f).name for f in files}:
            raise ReproInputError(f"{where}: no config.json under {root}")
        if not any(f.endswith(".safetensors") for f in files):
            raise ReproInputError(
                f"{where}: no safetensors weights under {root} (pickled weights are not fetched)"
            )
        entries.append(
            {**source.as_dict(), "revision": snapshot.name, "path": str(snapshot), "files": files}
        )
    return {"cache_dir": str(cache_dir), "sources": entries}


def _fetch_command(args) -> None:
    from repro.core.io import write_json

    try:
        params = json.loads(args.params)
    except json.JSONDecodeError as err:
        raise ReproInputError(f"--params: not valid JSON ({err})") from err
    if not isinstance(params, Mapping) or not params.get("cache_dir"):
        raise ReproInputError("--params: expected an object with 'cache_dir' and 'sources'")
    sources = [_source(entry, i) for i, entry in enumerate(params.get("sources") or [])]
    manifest = fetch(sources, params["cache_dir"])
    write_json(args.out, manifest)
    log.info("%d hub checkpoint(s) in %s -> %s", len(sources), manifest["cache_dir"], args.out)


def _list_command(args) -> None:
    from repro.core.config import load_yaml, merge

    config: dict = {}
    for path in args.configs:
        config = merge(config, load_yaml(path))
    for source in hub_sources(config):
        subfolder = f" (subfolder {source.subfolder})" if source.subfolder else ""
        print(f"{source.key}: {source.repo_id}{subfolder}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fetch_parser = commands.add_parser("fetch", help="download the sources, write a manifest")
    fetch_parser.add_argument("--params", required=True, help="JSON: cache_dir and sources")
    fetch_parser.add_argument("--out", required=True, help="the manifest (JSON) to write")
    list_parser = commands.add_parser("list", help="the hub checkpoints a config names")
    list_parser.add_argument("configs", nargs="+", help="config.yaml, then overlays")
    args = parser.parse_args(argv)
    # The log goes to stderr: `list` prints its answer on stdout.
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from repro.core.cli import log_command

    log_command(parser, argv)
    {"fetch": _fetch_command, "list": _list_command}[args.command](args)


if __name__ == "__main__":
    from repro.core.stage import run

    run(main)  # bad input: one line on stderr, exit status 2
