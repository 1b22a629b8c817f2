# Trained models a lab can use: the best run of each task as a model bundle, and predictions
# for new images with a bundle (config `predict: {model:, images:}`).


rule export_model:
    input:
        metrics=task_metrics,
        samples=paths.samples_file(R),
        classifiers=export_classifier_files,
        features=export_feature_dirs,
        weights=export_weight_files,
        preprocessing=export_preprocessing_files,
    output:
        bundle=directory(f"{R}/models/{{task}}"),
    log:
        f"{R}/logs/export_model/{{task}}.log",
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        export=config["export"],
    script:
        "../scripts/export_model.py"


rule reliability_diagram:
    input:
        metrics=task_metrics,
    output:
        figure=report(
            f"{R}/figures/{{task}}_reliability.png",
            caption="../report/reliability.rst",
            category="Figures",
            labels={"task": "{task}", "figure": "reliability"},
        ),
    log:
        f"{R}/logs/reliability/{{task}}.log",
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        task=lambda wildcards: TASKS[wildcards.task],
        dataset=dataset_label(config["dataset"]),
    script:
        "../scripts/reliability_diagram.py"


rule predict:
    input:
        model=config["predict"]["model"] or [],
        images=config["predict"]["images"],
    output:
        table=f"{R}/predictions/predictions.csv",
    log:
        f"{R}/logs/predict.log",
    benchmark:
        f"{R}/benchmarks/predict.tsv"
    conda:
        CONDA_ENV
    threads: config["compute"]["threads"]
    resources:
        **GPU_RESOURCES,
        mem_mb=config["compute"]["mem_mb_extract"],
        runtime=config["compute"]["runtime_extract"],
    params:
        top_k=config["predict"]["top_k"],
    script:
        "../scripts/predict.py"


rule saliency_gallery:
    input:
        bundle=rules.export_model.output.bundle,
        predictions=task_predictions,
        validated=rules.validate_images.output.table,
        weights=export_weight_files,
    output:
        figure=report(
            f"{R}/figures/{{task}}_gallery.png",
            caption="../report/gallery.rst",
            category="Figures",
            labels={"task": "{task}", "figure": "saliency gallery"},
        ),
        cells=f"{R}/tables/{{task}}_gallery.tsv",
    log:
        f"{R}/logs/gallery/{{task}}.log",
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=20,
    params:
        gallery=config["gallery"],
        dataset=dataset_label(config["dataset"]),
    script:
        "../scripts/saliency_gallery.py"
