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
# A seed's classifier runs that see no synthetic image (zero-shot CLIP, real-only at
# every shots): rule datadream_classify_real runs them in one job.
DATADREAM_REAL_METHODS = ("zero_shot", "real")
DATADREAM_REAL = [
    (method, generator, shots)
    for method, generator, shots in datadream_workflow.runs(DATADREAM)
    if method in DATADREAM_REAL_METHODS
]
DATADREAM_REAL_RUNS = [f"{m}_{g}_{s}shot" for m, g, s in DATADREAM_REAL]


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


def datadream_fewshot_runs(wildcards, input, output, threads):
    """datadream_fewshot's runs (repro.core.each): one few-shot set per datadream.shots."""
    return " ".join(
        each_run(
            {"--train": input.train, "--out": data},
            cfg=json.dumps(
                {
                    "shots": int(shots),
                    "seed": int(wildcards.seed),
                    "classnames": DATADREAM["classnames"],
                }
            ),
            rule_name="datadream_fewshot",
            threads=threads,
        )
        for shots, data in zip(DATADREAM["shots"], output.data, strict=True)
    )


def datadream_classifier_params(shots, seed):
    """datadream_classify's --params for a run at `shots` real shots per class."""
    return datadream_params(
        "classifier",
        seed,
        shots=int(shots),
        n_synthetic=DATADREAM["n_synthetic"],
        foundation=foundation_params("clip"),
    )


def datadream_real_runs(wildcards, input, output, threads):
    """datadream_classify_real's runs (repro.core.each): datadream_classify's command for
    each zero-shot and real-only run of the seed."""
    words = []
    for (method, generator, shots), table, metrics in zip(
        DATADREAM_REAL, output.tables, output.metrics, strict=True
    ):
        args = {}
        if int(shots) > 0:
            args["--fewshot"] = datadream_fewshot(shots, wildcards.seed)
        args.update(
            {
                "--val": input.val,
                "--test": input.test,
                "--method": method,
                "--generator": generator,
                "--out": table,
                "--metrics": metrics,
                "--checkpoint-dir": "checkpoints/datadream/classify",
            }
        )
        words.append(
            each_run(
                args,
                cfg=datadream_classifier_params(shots, wildcards.seed),
                rule_name="datadream_classify_real",
                threads=threads,
            )
        )
    return " ".join(words)


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
