# External test sets: validated, extracted and predicted in folders of their own. No training
# job (split, augment, train_svm, finetune) has any of these files among its inputs.


rule demo_external_data:
    output:
        manifest=f"{R}/demo_external/manifest.csv",
    log:
        f"{R}/logs/demo_external_data.log",
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        demo=config["dataset"]["demo"],
    script:
        "../scripts/demo_external_data.py"


rule validate_external:
    input:
        dataset=external_source,
        # the study's images: one with the same bytes is rejected (in_study), not scored
        study=rules.validate_images.output.table,
    output:
        table=f"{R}/external/{{ext}}/validated.tsv",
        summary=f"{R}/external/{{ext}}/validation.json",
    log:
        f"{R}/logs/validate_external/{{ext}}.log",
    benchmark:
        f"{R}/benchmarks/validate_external/{{ext}}.tsv"
    conda:
        CONDA_ENV
    threads: 2
    resources:
        mem_mb=2000,
        runtime=60,
    params:
        external=lambda wildcards: EXTERNAL_ZERO_SHOT[wildcards.ext],
        validation=config["validation"],
    script:
        "../scripts/validate_external.py"


rule analyse_external_images:
    input:
        validated=rules.validate_external.output.table,
    output:
        table=paths.external_analysis_table(R),
    log:
        f"{R}/logs/analyse_external_images/{{ext}}/{{key}}.log",
    benchmark:
        f"{R}/benchmarks/analyse_external_images/{{ext}}/{{key}}.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=60,
    params:
        step=lambda wildcards: ANALYSES[wildcards.key],
        # not read by the script: a new segmentation reruns the table
        segmentation=SEGMENTATION_VERSION,
    script:
        "../scripts/analyse_images.py"


rule extract_external_features:
    input:
        validated=rules.validate_external.output.table,
        weights=lambda wildcards: weights_input(wildcards.backbone),
        # the set's own crop boxes; a stain reference fitted on the training part only
        preprocessing=external_preprocessing_inputs,
    output:
        directory(paths.external_features_dir(R, prep="{prep}")),
    log:
        f"{R}/logs/extract_external_features/{{ext}}/{{adapt}}/{{backbone}}{{prep}}.log",
    benchmark:
        f"{R}/benchmarks/extract_external_features/{{ext}}/{{adapt}}/{{backbone}}{{prep}}.tsv"
    wildcard_constraints:
        adapt="none|bn",
    conda:
        CONDA_ENV
    threads: config["compute"]["threads"]
    resources:
        **GPU_RESOURCES,
        mem_mb=config["compute"]["mem_mb_extract"],
        runtime=config["compute"]["runtime_extract"],
    params:
        layers=lambda wildcards: EXTRACT[wildcards.backbone],
        weights=lambda wildcards: weights_setting(config, wildcards.backbone)[0],
        sha256=lambda wildcards: weights_setting(config, wildcards.backbone)[1],
        precision=config["features"]["precision"],
        preprocessing=preprocessing_record,
    script:
        "../scripts/extract_external_features.py"


rule predict_external_svm:
    input:
        model=rules.train_svm.output.model,
        validated=rules.validate_external.output.table,
        features=external_feature_dirs,
    output:
        predictions=paths.external_run_file(
            R, paths.PREDICTIONS, strategy="{svm_strategy}", prep="{prep}"
        ),
    log:
        f"{R}/logs/predict_external/{{task}}/{{svm_strategy}}/{{backbone}}{{prep}}/{{layer}}/{{fold}}/{{ext}}/{{adapt}}.log",
    wildcard_constraints:
        adapt="none|bn",
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        task=lambda wildcards: TASKS[wildcards.task],
        external=lambda wildcards: EXTERNAL_ZERO_SHOT[wildcards.ext],
    script:
        "../scripts/predict_external_svm.py"


rule predict_external_finetune:
    input:
        model=rules.finetune.output.model,
        validated=rules.validate_external.output.table,
        weights=lambda wildcards: weights_input(wildcards.backbone),
        features=external_finetune_feature_dirs,
        preprocessing=external_preprocessing_inputs,
    output:
        predictions=paths.external_run_file(
            R,
            paths.PREDICTIONS,
            strategy="finetune",
            layer=paths.STRATEGY_LAYER["finetune"],
            prep="{prep}",
        ),
        features=directory(
            paths.external_run_file(
                R,
                paths.FINETUNED_FEATURES,
                strategy="finetune",
                layer=paths.STRATEGY_LAYER["finetune"],
                prep="{prep}",
            )
        ),
    log:
        f"{R}/logs/predict_external/{{task}}/finetune/{{backbone}}{{prep}}/{{fold}}/{{ext}}/{{adapt}}.log",
    benchmark:
        f"{R}/benchmarks/predict_external/{{task}}/finetune/{{backbone}}{{prep}}/{{fold}}/{{ext}}/{{adapt}}.tsv"
    wildcard_constraints:
        adapt="none|bn",
    conda:
        CONDA_ENV
    threads: config["compute"]["threads"]
    resources:
        **GPU_RESOURCES,
        mem_mb=config["compute"]["mem_mb_finetune"],
        runtime=config["compute"]["runtime_finetune"],
    params:
        task=lambda wildcards: TASKS[wildcards.task],
        external=lambda wildcards: EXTERNAL_ZERO_SHOT[wildcards.ext],
        settings=lambda wildcards: finetune_result_settings(wildcards.backbone),
        preprocessing=preprocessing_record,
    script:
        "../scripts/predict_external_finetune.py"


rule adapt_external_svm:
    # Few-shot (evaluation.external[].train_per_class): the run's SVM refitted on its training
    # part + k labelled cells per class of the set; the run's own files stay as they are.
    input:
        model=rules.train_svm.output.model,
        samples=samples_input,
        features=feature_dirs,
        validated=rules.validate_external.output.table,
        external_features=unadapted_external_feature_dirs,
    output:
        predictions=paths.external_run_file(
            R,
            paths.PREDICTIONS,
            strategy="{svm_strategy}",
            adapt="shots",
            prep="{prep}",
        ),
        internal=paths.external_run_file(
            R,
            paths.INTERNAL_PREDICTIONS,
            strategy="{svm_strategy}",
            adapt="shots",
            prep="{prep}",
        ),
        shots=paths.external_run_file(
            R, paths.SHOTS, strategy="{svm_strategy}", adapt="shots", prep="{prep}"
        ),
        model=paths.external_run_file(
            R, paths.SVM_MODEL, strategy="{svm_strategy}", adapt="shots", prep="{prep}"
        ),
    log:
        f"{R}/logs/adapt_external_svm/{{task}}/{{svm_strategy}}/{{backbone}}{{prep}}/{{layer}}/{{fold}}/{{ext}}.log",
    benchmark:
        f"{R}/benchmarks/adapt_external_svm/{{task}}/{{svm_strategy}}/{{backbone}}{{prep}}/{{layer}}/{{fold}}/{{ext}}.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=config["compute"]["mem_mb_svm"],
        runtime=config["compute"]["runtime_svm"],
    params:
        task=lambda wildcards: TASKS[wildcards.task],
        external=lambda wildcards: EXTERNAL_CFG[wildcards.ext],
        seed=config["evaluation"]["seed"],
    script:
        "../scripts/adapt_external_svm.py"


rule evaluate_external:
    input:
        unpack(evaluate_external_inputs),
        samples=paths.samples_file(R),
        validated=rules.validate_external.output.table,
    output:
        metrics=paths.external_run_file(R, paths.METRICS, prep="{prep}"),
    log:
        f"{R}/logs/evaluate_external/{{task}}/{{strategy}}/{{backbone}}{{prep}}/{{layer}}/{{fold}}/{{ext}}/{{adapt}}.log",
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        task=lambda wildcards: TASKS[wildcards.task],
        external=external_entry_for_adapt,
        evaluation={k: config["evaluation"][k] for k in ("n_bootstrap", "seed")},
    script:
        "../scripts/evaluate_external.py"


rule compare_external:
    input:
        metrics=external_set_metrics,
        predictions=external_set_predictions,
        samples=paths.samples_file(R),
        validated=rules.validate_external.output.table,
    output:
        csv=report(
            paths.comparisons_table(R, ext="{ext}"),
            caption="../report/comparisons_external.rst",
            category="Comparisons",
            labels={"task": "{task}", "format": "CSV, external set {ext}"},
        ),
        md=paths.comparisons_table(R, ext="{ext}", fmt="md"),
        tex=paths.comparisons_table(R, ext="{ext}", fmt="tex"),
        figure=report(
            paths.comparisons_figure(R, ext="{ext}"),
            caption="../report/comparisons_external_figure.rst",
            category="Comparisons",
            labels={
                "task": "{task}",
                "figure": "paired differences, external set {ext}",
            },
        ),
    log:
        f"{R}/logs/compare_external/{{task}}/{{ext}}.log",
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=20,
    params:
        task=lambda wildcards: TASKS[wildcards.task],
        external=lambda wildcards: EXTERNAL_ZERO_SHOT[wildcards.ext],
        evaluation=comparison_settings(),
    script:
        "../scripts/compare_external.py"


rule summarise_external:
    input:
        external=external_task_metrics,
        internal=task_metrics,
        comparisons=external_task_comparisons,
    output:
        csv=report(
            f"{R}/tables/{{task}}_external.csv",
            caption="../report/external.rst",
            category="Tables",
            labels={"task": "{task}", "format": "CSV, internal vs external"},
        ),
        md=f"{R}/tables/{{task}}_external.md",
        tex=f"{R}/tables/{{task}}_external.tex",
        figure=report(
            f"{R}/figures/{{task}}_external.png",
            caption="../report/external_figure.rst",
            category="Figures",
            labels={"task": "{task}", "figure": "internal vs external"},
        ),
    log:
        f"{R}/logs/summarise_external/{{task}}.log",
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        task=lambda wildcards: TASKS[wildcards.task],
        externals=config["evaluation"]["external"],
        compared=lambda wildcards: external_sets_of(wildcards.task),
        dataset=dataset_label(config["dataset"]),
    script:
        "../scripts/summarise_external.py"
