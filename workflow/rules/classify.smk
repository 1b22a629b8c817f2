# SVM on frozen or fine-tuned features, and the evaluation of every run's predictions.


rule train_svm:
    input:
        samples=rules.augment.output.samples,
        features=feature_dirs,
    output:
        model=f"{R}/runs/{{task}}/{{svm_strategy}}/{{backbone}}/{{layer}}/{{fold}}/svm.skops",
        predictions=f"{R}/runs/{{task}}/{{svm_strategy}}/{{backbone}}/{{layer}}/{{fold}}/predictions.tsv",
        cv_results=f"{R}/runs/{{task}}/{{svm_strategy}}/{{backbone}}/{{layer}}/{{fold}}/cv_results.tsv",
    log:
        f"{R}/logs/train_svm/{{task}}/{{svm_strategy}}/{{backbone}}/{{layer}}/{{fold}}.log",
    benchmark:
        f"{R}/benchmarks/train_svm/{{task}}/{{svm_strategy}}/{{backbone}}/{{layer}}/{{fold}}.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        task=lambda wildcards: TASKS[wildcards.task],
        svm=config["svm"],
    script:
        "../scripts/train_svm.py"


rule evaluate:
    input:
        predictions=f"{R}/runs/{{task}}/{{strategy}}/{{backbone}}/{{layer}}/{{fold}}/predictions.tsv",
        samples=rules.augment.output.samples,
    output:
        metrics=f"{R}/runs/{{task}}/{{strategy}}/{{backbone}}/{{layer}}/{{fold}}/metrics.json",
        confusion=f"{R}/runs/{{task}}/{{strategy}}/{{backbone}}/{{layer}}/{{fold}}/confusion.csv",
        confusion_png=f"{R}/runs/{{task}}/{{strategy}}/{{backbone}}/{{layer}}/{{fold}}/confusion.png",
    log:
        f"{R}/logs/evaluate/{{task}}/{{strategy}}/{{backbone}}/{{layer}}/{{fold}}.log",
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        task=lambda wildcards: TASKS[wildcards.task],
        evaluation=config["evaluation"],
        weights=lambda wildcards: weights_setting(
            config, wildcards.backbone.split("+")[0]
        )[0],
    script:
        "../scripts/evaluate.py"
