# Frozen-backbone features: once per image x transform x backbone x layer, shared by every
# task, split, fold and classifier. Only validation and the augmentation setting feed it, so
# changing a split, an SVM setting or a metric never reruns extraction.


rule extract_features:
    input:
        validated=rules.validate_images.output.table,
        weights=lambda wildcards: weights_input(wildcards.backbone),
    output:
        directory(paths.features_dir(R)),
    log:
        f"{R}/logs/extract_features/{{backbone}}.log",
    benchmark:
        f"{R}/benchmarks/extract_features/{{backbone}}.tsv"
    conda:
        CONDA_ENV
    threads: config["compute"]["threads"]
    resources:
        **GPU_RESOURCES,
        mem_mb=config["compute"]["mem_mb_extract"],
        runtime=config["compute"]["runtime_extract"],
    params:
        layers=lambda wildcards: EXTRACT[wildcards.backbone],
        weights=weights_name,
        sha256=weights_sha256,
        augmentation=config["augmentation"],
        # what changes the values (precision); batch size, workers, device and the optimised
        # path change speed only: the job reads those from the config, so they never rerun it
        features=features_result_settings(config),
    script:
        "../scripts/extract_features.py"
