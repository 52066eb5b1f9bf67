"""Foundation models: the pre-trained models that several papers share.

The papers start from hub checkpoints (a text-to-image model and a CLIP for
DataDream and ProbeX, a text-to-video Wan model for HuMo and SLA, ...). This room
holds their tiny stand-ins and the one way every paper gets such a model.

The contract:

- One config key per model: `foundation.<name>.pretrained` (with an optional
  `foundation.<name>.subfolder`), in the `foundation` section of config.yaml,
  schema `$defs/foundation_model` in schemas/config.schema.yaml.
- `pretrained: null` (tiny and smoke scale): the model is a tiny config of the
  paper's own class (diffusers / transformers), built and pre-trained by a rule
  of rules/foundation.smk, `foundation_<name>`, on bundled or generated data, into
  `models/foundation/<name>`: a directory written by `save_pretrained` through
  `repro.foundation.store.save_foundation` (atomic, tagged `foundation.<name>`).
- `pretrained: <hub id>` (paper scale): `hub_fetch` downloads it into the hub cache
  (repro.core.hub iterates the `foundation` entries); `pretrained: <local dir>`:
  loaded from there.
- A rule that needs model <name> takes `foundation_input("<name>")` as input (the
  built directory, the hub manifest, or the local directory) and passes
  `foundation_params("<name>")` in its --params (rules/foundation.smk); the stage
  loads it with `repro.foundation.store.load_foundation(cls, params, component)`,
  the same code at every scale (from_pretrained, with the hub cache options).

Imports run downward: foundation may import core and kernels, never a paper;
every paper may import it. A model two papers share lives here, not in either.
`repro.foundation.store` stays light at import (no torch): Snakemake imports it
when it parses the workflow.
"""
