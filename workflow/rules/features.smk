# Frozen-backbone features: once per image x transform x backbone x layer, shared by every
# task, split, fold and classifier. Only validation and the augmentation setting feed it, so
# changing a split, an SVM setting or a metric never reruns extraction.


rule extract_features:
    input:
        validated=rules.validate_images.output.table,
        weights=lambda wildcards: weights_input(wildcards.backbone),
    output:
        directory(f"{R}/features/{{backbone}}"),
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
        weights=lambda wildcards: weights_setting(config, wildcards.backbone)[0],
        sha256=lambda wildcards: weights_setting(config, wildcards.backbone)[1],
        augmentation=config["augmentation"],
        precision=config["features"]["precision"],
    script:
        "../scripts/extract_features.py"
