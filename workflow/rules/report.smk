# Aggregation: paper-style tables per task, figures, and the material of `snakemake --report`.


rule summarise_task:
    input:
        metrics=task_metrics,
        comparisons=f"{R}/tables/{{task}}_comparisons.csv",
    output:
        csv=report(
            f"{R}/tables/{{task}}.csv",
            caption="../report/table.rst",
            category="Tables",
            labels={"task": "{task}", "format": "CSV"},
        ),
        md=f"{R}/tables/{{task}}.md",
        tex=f"{R}/tables/{{task}}.tex",
        accuracy=report(
            f"{R}/figures/{{task}}_accuracy.png",
            caption="../report/accuracy.rst",
            category="Figures",
            labels={"task": "{task}", "figure": "accuracy"},
        ),
        confusion=report(
            f"{R}/figures/{{task}}_confusion.png",
            caption="../report/confusion.rst",
            category="Figures",
            labels={"task": "{task}", "figure": "confusion matrices"},
        ),
        per_class=report(
            f"{R}/tables/{{task}}_per_class.csv",
            caption="../report/per_class.rst",
            category="Tables",
            labels={"task": "{task}", "format": "per-class CSV"},
        ),
        per_class_md=f"{R}/tables/{{task}}_per_class.md",
    log:
        f"{R}/logs/summarise/{{task}}.log",
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        task=lambda wildcards: TASKS[wildcards.task],
        dataset=dataset_label(config["dataset"]),
        baselines=config["evaluation"]["baselines"],
    script:
        "../scripts/summarise_task.py"


rule collect_runs:
    input:
        metrics=[f"{R}/{run.path}/{paths.METRICS}" for run in RUNS],
        validation=rules.validate_images.output.summary,
    output:
        runs=report(
            f"{R}/tables/all_runs.tsv",
            caption="../report/all_runs.rst",
            category="Tables",
            labels={"task": "all", "format": "TSV"},
        ),
        study=f"{R}/study.json",
    log:
        f"{R}/logs/collect_runs.log",
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    script:
        "../scripts/collect_runs.py"


rule compare_runs:
    input:
        metrics=task_metrics,
        predictions=task_predictions,
        samples=paths.samples_file(R),
    output:
        csv=report(
            f"{R}/tables/{{task}}_comparisons.csv",
            caption="../report/comparisons.rst",
            category="Comparisons",
            labels={"task": "{task}", "format": "CSV"},
        ),
        md=f"{R}/tables/{{task}}_comparisons.md",
        tex=f"{R}/tables/{{task}}_comparisons.tex",
        figure=report(
            f"{R}/figures/{{task}}_comparisons.png",
            caption="../report/comparisons_figure.rst",
            category="Comparisons",
            labels={"task": "{task}", "figure": "paired differences"},
        ),
    log:
        f"{R}/logs/compare_runs/{{task}}.log",
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=20,
    params:
        task=lambda wildcards: TASKS[wildcards.task],
        evaluation=comparison_settings(),
        dataset=dataset_label(config["dataset"]),
    script:
        "../scripts/compare_runs.py"


rule feature_map:
    input:
        features=paths.features_dir(R, prep="{prep}"),
        samples=[paths.samples_file(R, task) for task in TASKS],
        external_features=external_map_features,
        external_validated=external_map_tables,
    output:
        figure=report(
            f"{R}/figures/features/{{backbone}}{{prep}}-{{layer}}.png",
            caption="../report/feature_map.rst",
            category="Feature maps",
            labels={"backbone": "{backbone}{prep}", "layer": "{layer}"},
        ),
    log:
        f"{R}/logs/feature_map/{{backbone}}{{prep}}-{{layer}}.log",
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        tasks=TASKS,
        externals=[EXTERNAL_CFG[name] for name in EXTERNAL],
        classes={name: list(task["classes"]) for name, task in TASKS.items()},
        settings=config["evaluation"]["feature_map"],
        seed=config["evaluation"]["seed"],
        dataset=dataset_label(config["dataset"]),
    script:
        "../scripts/feature_map.py"
