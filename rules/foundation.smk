# Foundation models that several papers share (repro.foundation): the helpers
# that give a job the model it loads. One config key per model,
# foundation.<name>.pretrained, whose value decides where the model comes from:
#
# - null (tiny, smoke): the model is built into models/foundation/<name>
#   (foundation_dir) by its build rule `foundation_<name>`, which writes it with
#   repro.foundation.store.save_foundation. Build rules go in
#   rules/foundation_<name>.smk (one include line in the Snakefile, after this
#   file): `snakemake --lint` wants helpers and rules in separate files.
# - a hub id (paper): hub_fetch downloads it into the hub cache first.
# - a local directory: read there.
#
# A rule that needs model <name> never asks which; it takes
#     input:  t2i=foundation_input("t2i"),
#     params: cfg=section("datadream", "train", foundation=foundation_params("t2i")),
# and its stage calls
#     repro.foundation.store.load_foundation(cls, params["foundation"]["t2i"], component)
# the same code at every scale.
#
# Built so far: t2i (rules/foundation_t2i.smk, repro.foundation.t2i) and clip
# (rules/foundation_clip.smk, repro.foundation.clip), both pre-trained on the glyph
# corpus (rule glyph_corpus). A paper that needs another model (HuMo's Wan) adds
# its config entry, its build rule and its module in repro.foundation.
from repro.foundation import store as foundation_store

FOUNDATION = config["foundation"]


def foundation_dir(name):
    """The directory the build rule of model `name` writes (its output)."""
    return foundation_store.built_dir(name)


def foundation_input(*names):
    """Inputs of a job that loads foundation models `names`: each built directory,
    the hub manifest or the local directory (repro.foundation.store.model_input)."""
    inputs = []
    for name in names:
        inputs += foundation_store.model_input(config, name, HUB_MANIFEST)
    return list(dict.fromkeys(inputs))


def foundation_params(*names):
    """{name: what the stage needs to load it} for --params (store.model_params)."""
    return {name: foundation_store.model_params(config, name) for name in names}
