# Aggregation: paper-style tables per task, figures, and the material of `snakemake --report`.


rule summarise_task:
    input:
        metrics=task_metrics,
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
