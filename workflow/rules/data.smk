# Input stages: (demo data) -> validation -> per-task split -> per-task augmented sample lists.


rule demo_data:
    output:
        manifest=f"{R}/demo_data/manifest.csv",
        images=directory(f"{R}/demo_data/images"),
    log:
        f"{R}/logs/demo_data.log",
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        demo=config["dataset"]["demo"],
    script:
        "../scripts/demo_data.py"


rule validate_images:
    input:
        dataset=dataset_input,
    output:
        table=f"{R}/data/validated.tsv",
        summary=f"{R}/data/validation.json",
    log:
        f"{R}/logs/validate_images.log",
    benchmark:
        f"{R}/benchmarks/validate_images.tsv"
    conda:
        CONDA_ENV
    threads: 2
    resources:
        mem_mb=2000,
        runtime=60,
    params:
        tasks=config["tasks"],
        validation=config["validation"],
    script:
        "../scripts/validate_images.py"


rule split:
    input:
        validated=rules.validate_images.output.table,
    output:
        table=f"{R}/data/splits/{{task}}.tsv",
    log:
        f"{R}/logs/split/{{task}}.log",
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        task=lambda wildcards: TASKS[wildcards.task],
        split=config["split"],
    script:
        "../scripts/split.py"


rule augment:
    input:
        split=rules.split.output.table,
    output:
        # a variant that draws colour views has its own table (its training views)
        samples=paths.samples_file(R, prep="{prep}"),
    log:
        f"{R}/logs/augment/{{task}}{{prep}}.log",
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        augmentation=config["augmentation"],
        tta=config["evaluation"]["tta"],
        preprocessing=preprocessing_record,
    script:
        "../scripts/augment.py"
