# SVM on frozen or fine-tuned features, and the evaluation of every run's predictions.
# Run paths come from leukotype.paths (the same helper config.Run uses).


rule train_svm:
    input:
        samples=samples_input,
        features=feature_dirs,
    output:
        model=paths.run_file(
            R, paths.SVM_MODEL, strategy="{svm_strategy}", prep="{prep}"
        ),
        predictions=paths.run_file(
            R, paths.PREDICTIONS, strategy="{svm_strategy}", prep="{prep}"
        ),
        cv_results=paths.run_file(
            R, paths.CV_RESULTS, strategy="{svm_strategy}", prep="{prep}"
        ),
        calibration=paths.run_file(
            R, paths.CALIBRATION, strategy="{svm_strategy}", prep="{prep}"
        ),
    log:
        f"{R}/logs/train_svm/{{task}}/{{svm_strategy}}/{{backbone}}{{prep}}/{{layer}}/{{fold}}.log",
    benchmark:
        f"{R}/benchmarks/train_svm/{{task}}/{{svm_strategy}}/{{backbone}}{{prep}}/{{layer}}/{{fold}}.tsv"
    conda:
        CONDA_ENV
    threads: config["compute"]["threads_svm"]
    resources:
        # The kernel-memory budget (svm.solver: auto) derives from the mem_mb the job gets.
        mem_mb=config["compute"]["mem_mb_svm"],
        runtime=config["compute"]["runtime_svm"],
    params:
        task=lambda wildcards: TASKS[wildcards.task],
        svm=config["svm"],
    script:
        "../scripts/train_svm.py"


rule evaluate:
    input:
        predictions=paths.run_file(R, paths.PREDICTIONS, prep="{prep}"),
        samples=paths.samples_file(R),
        features=run_feature_dirs,
        cv_results=svm_cv_results,
        calibration=paths.run_file(R, paths.CALIBRATION, prep="{prep}"),
    output:
        metrics=paths.run_file(R, paths.METRICS, prep="{prep}"),
        confusion=paths.run_file(R, paths.CONFUSION, prep="{prep}"),
        confusion_png=paths.run_file(R, paths.CONFUSION_PNG, prep="{prep}"),
    log:
        f"{R}/logs/evaluate/{{task}}/{{strategy}}/{{backbone}}{{prep}}/{{layer}}/{{fold}}.log",
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        task=lambda wildcards: TASKS[wildcards.task],
        evaluation={
            k: v
            for k, v in config["evaluation"].items()
            # nor the external sets: adding one must not re-evaluate the internal runs
            if k
            not in ("baselines", "feature_map", "alpha", "external", "adapt_batchnorm")
        },
        weights=weights_name,
    script:
        "../scripts/evaluate.py"
