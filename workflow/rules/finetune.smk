# Fine-tuning: a new head for the task's classes on a partly frozen backbone (or the paper's
# small CNN from scratch). Checkpoints live outside the outputs so an interrupted job resumes.
# Only settings that change the result are params (device, workers, threads and the fast path
# are read from the config by the script), so moving a run to a GPU never reschedules it.


rule finetune:
    input:
        samples=samples_input,
        validated=rules.validate_images.output.table,
        weights=lambda wildcards: weights_input(wildcards.backbone),
        features=finetune_feature_dirs,
        preprocessing=preprocessing_inputs,
    output:
        model=paths.finetune_file(R, paths.FINETUNED_MODEL, prep="{prep}"),
        history=paths.finetune_file(R, paths.HISTORY, prep="{prep}"),
        curve=paths.finetune_file(R, paths.LEARNING_CURVE, prep="{prep}"),
        predictions=paths.finetune_file(R, paths.PREDICTIONS, prep="{prep}"),
        calibration=paths.finetune_file(R, paths.CALIBRATION, prep="{prep}"),
        features=directory(paths.finetuned_features_dir(R, prep="{prep}")),
    log:
        f"{R}/logs/finetune/{{task}}/{{backbone}}{{prep}}/{{fold}}.log",
    benchmark:
        f"{R}/benchmarks/finetune/{{task}}/{{backbone}}{{prep}}/{{fold}}.tsv"
    conda:
        CONDA_ENV
    threads: config["compute"]["threads"]
    resources:
        **GPU_RESOURCES,
        mem_mb=config["compute"]["mem_mb_finetune"],
        runtime=config["compute"]["runtime_finetune"],
    params:
        task=lambda wildcards: TASKS[wildcards.task],
        settings=lambda wildcards: finetune_result_settings(wildcards.backbone),
        weights=weights_name,
        sha256=weights_sha256,
        preprocessing=preprocessing_record,
        # a plain pattern (Snakemake fills in the wildcards): cheaper than a function per job
        checkpoint_dir=paths.checkpoint_dir(R, prep="{prep}"),
    script:
        "../scripts/finetune.py"
