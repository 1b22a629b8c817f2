# Fine-tuning: a new head for the task's classes on a partly frozen backbone (or the paper's
# small CNN from scratch). Checkpoints live outside the outputs so an interrupted job resumes.
# Only settings that change the result are params (device, workers, threads and the fast path
# are read from the config by the script), so moving a run to a GPU never reschedules it.


rule finetune:
    input:
        samples=rules.augment.output.samples,
        validated=rules.validate_images.output.table,
        weights=lambda wildcards: weights_input(wildcards.backbone),
        features=finetune_feature_dirs,
    output:
        model=paths.finetune_file(R, paths.FINETUNED_MODEL),
        history=paths.finetune_file(R, paths.HISTORY),
        curve=paths.finetune_file(R, paths.LEARNING_CURVE),
        predictions=paths.finetune_file(R, paths.PREDICTIONS),
        calibration=paths.finetune_file(R, paths.CALIBRATION),
        features=directory(paths.finetuned_features_dir(R)),
    log:
        f"{R}/logs/finetune/{{task}}/{{backbone}}/{{fold}}.log",
    benchmark:
        f"{R}/benchmarks/finetune/{{task}}/{{backbone}}/{{fold}}.tsv"
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
        # a plain pattern (Snakemake fills in the wildcards): cheaper than a function per job
        checkpoint_dir=paths.checkpoint_dir(R),
    script:
        "../scripts/finetune.py"
