# Fine-tuning: a new head for the task's classes on a partly frozen backbone (or the paper's
# small CNN from scratch). Checkpoints live outside the outputs so an interrupted job resumes.


rule finetune:
    input:
        samples=rules.augment.output.samples,
        validated=rules.validate_images.output.table,
        weights=lambda wildcards: weights_input(wildcards.backbone),
        features=finetune_feature_dirs,
    output:
        model=f"{R}/runs/{{task}}/finetune/{{backbone}}/softmax/{{fold}}/model.pt",
        history=f"{R}/runs/{{task}}/finetune/{{backbone}}/softmax/{{fold}}/history.tsv",
        curve=f"{R}/runs/{{task}}/finetune/{{backbone}}/softmax/{{fold}}/learning_curve.png",
        predictions=f"{R}/runs/{{task}}/finetune/{{backbone}}/softmax/{{fold}}/predictions.tsv",
        features=directory(
            f"{R}/runs/{{task}}/finetune/{{backbone}}/softmax/{{fold}}/features"
        ),
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
        settings=lambda wildcards: finetune_settings(config, wildcards.backbone),
        weights=lambda wildcards: weights_setting(config, wildcards.backbone)[0],
        # a plain pattern (Snakemake fills in the wildcards): cheaper than a function per job
        checkpoint_dir=f"{R}/checkpoints/{{task}}/{{backbone}}/{{fold}}",
    script:
        "../scripts/finetune.py"
