# Frozen-backbone features: once per image x transform x backbone x layer, shared by every
# task, split, fold and classifier. Only validation and the augmentation setting feed it, so
# changing a split, an SVM setting or a metric never reruns extraction.


rule extract_features:
    input:
        validated=rules.validate_images.output.table,
        weights=lambda wildcards: weights_input(wildcards.backbone),
        preprocessing=preprocessing_inputs,
    output:
        directory(paths.features_dir(R, prep="{prep}")),
    log:
        f"{R}/logs/extract_features/{{backbone}}{{prep}}.log",
    benchmark:
        f"{R}/benchmarks/extract_features/{{backbone}}{{prep}}.tsv"
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
        # the variant's steps (crop, stain, colour views): one feature folder per variant
        preprocessing=preprocessing_record,
    script:
        "../scripts/extract_features.py"
