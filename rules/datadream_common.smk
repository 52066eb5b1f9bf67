# DataDream's helpers (rules/datadream.smk includes this file): its config, the
# files each job needs, chosen from the wildcards. Functions only: `snakemake
# --lint` wants helpers and rules in separate files.
#
# Paths are keyed by (shots, seed): the few-shot set data/datadream/fewshot/
# {shots}shot_s{seed}, and every synthetic set, LoRA and classifier run made from
# it. The unadapted generator sees no real image: its synthetic sets have shots 0.
from repro.datadream import workflow as datadream_workflow

DATADREAM = config["datadream"]
DATADREAM_LABEL = PAPERS["datadream"].label  # the report's category
# The real data set: the digits, or an entry of data.imagefolders (paper scale).
DATADREAM_DATASET = DATADREAM.get("dataset", "digits")
# The largest synthetic set per class: generation makes it once, classifiers read prefixes.
DATADREAM_N_MAX = max(DATADREAM["n_synthetic"])


def datadream_params(key, seed=None, **extra):
    """Section `key` of datadream as JSON for --params, with what every stage of the
    paper needs beside it: the prompt template, the class names, the seed."""
    node = {
        **DATADREAM[key],
        "prompt": DATADREAM["prompt"],
        "classnames": DATADREAM["classnames"],
        **extra,
    }
    if seed is not None:
        node["seed"] = int(seed)
    return json.dumps(node, sort_keys=True)


def datadream_split(split):
    """The real data set's train / val / test file."""
    return classification_split(DATADREAM_DATASET, split)


def datadream_fewshot(shots, seed):
    return f"data/datadream/fewshot/{shots}shot_s{seed}.safetensors"


def datadream_synthetic(generator, shots, seed):
    return f"data/datadream/synthetic/{generator}_{shots}shot_s{seed}.safetensors"


def datadream_lora_input(wildcards):
    """The generator's LoRA file: none for the unadapted generator."""
    if wildcards.generator == datadream_workflow.UNADAPTED:
        return []
    return [
        f"models/datadream/lora/{wildcards.generator}_{wildcards.shots}shot_s{wildcards.seed}.safetensors"
    ]


def datadream_run_inputs(wildcards):
    """A classifier run's data: the few-shot set (if it sees real shots) and the
    synthetic set (if its method uses one)."""
    inputs = {}
    if int(wildcards.shots) > 0:
        inputs["fewshot"] = datadream_fewshot(wildcards.shots, wildcards.seed)
    if wildcards.dd_method in ("synthetic", "real_synthetic"):
        generator = wildcards.dd_generator
        shots = 0 if generator == datadream_workflow.UNADAPTED else wildcards.shots
        inputs["synthetic"] = datadream_synthetic(generator, shots, wildcards.seed)
    return inputs


def datadream_data_args(wildcards, input):
    """The stage arguments of datadream_run_inputs' files."""
    args = []
    for key in ("fewshot", "synthetic"):
        if key in input.keys():
            args += [f"--{key}", shlex.quote(input[key])]
    return " ".join(args)


def datadream_runs():
    """Every classifier run's table (repro.datadream.workflow.runs, per seed)."""
    return [
        f"results/datadream/runs/{method}_{generator}_{shots}shot_s{seed}.csv"
        for seed in SEEDS
        for method, generator, shots in datadream_workflow.runs(DATADREAM)
    ]


def datadream_fids():
    """Every synthetic set's FID JSON."""
    return [
        f"results/datadream/fid/{generator}_{shots}shot_s{seed}.json"
        for seed in SEEDS
        for generator, shots in datadream_workflow.synthetic_sets(DATADREAM)
    ]


def datadream_grid_sets():
    """The sample grid's synthetic sets at the main shots, first seed, by generator."""
    seed, shots = SEEDS[0], DATADREAM["main_shots"]
    return {
        generator: datadream_synthetic(
            generator,
            0 if generator == datadream_workflow.UNADAPTED else shots,
            seed,
        )
        for generator in datadream_workflow.generators(DATADREAM)
    }
